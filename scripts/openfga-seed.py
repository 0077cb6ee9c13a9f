#!/usr/bin/env python3
"""Create (or reuse) an OpenFGA store, write an authorization model and demo tuples.

    scripts/openfga-seed.py API_URL STORE_NAME MODEL_JSON TUPLES_JSON

Prints `STORE_ID=<id>` and `MODEL_ID=<id>` on stdout. Idempotent: a store with that name is
reused, tuples that already exist are skipped. Waits up to 60 s for OpenFGA to answer.
Used by scripts/dev-stack.sh and docker-compose.yml (standard library only).
"""
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request


def call(api, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(api + path, data=data, method=method)
    req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, {"message": text}


def die(msg):
    print(f"openfga-seed: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    if len(sys.argv) != 5:
        die("usage: openfga-seed.py API_URL STORE_NAME MODEL_JSON TUPLES_JSON")
    api, name, model_path, tuples_path = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3], sys.argv[4]
    with open(model_path) as f:
        model = json.load(f)
    with open(tuples_path) as f:
        tuples = json.load(f)["tuples"]

    deadline = time.time() + 60
    while True:
        try:
            status, _ = call(api, "GET", "/healthz")
            if status == 200:
                break
        except OSError:
            pass
        if time.time() > deadline:
            die(f"OpenFGA at {api} did not answer /healthz within 60 s")
        time.sleep(0.5)

    store_id = None
    status, body = call(api, "GET", "/stores?page_size=100&name=" + urllib.parse.quote(name))
    if status == 200:
        for s in body.get("stores", []):
            if s.get("name") == name:
                store_id = s["id"]
    if store_id is None:
        status, body = call(api, "POST", "/stores", {"name": name})
        if status != 201:
            die(f"create store {name}: {status} {body}")
        store_id = body["id"]

    status, body = call(api, "POST", f"/stores/{store_id}/authorization-models", model)
    if status != 201:
        die(f"write model {model_path}: {status} {body}")
    model_id = body["authorization_model_id"]

    for t in tuples:
        key = {"user": t["user"], "relation": t["relation"], "object": t["object"]}
        status, body = call(api, "POST", f"/stores/{store_id}/write",
                            {"writes": {"tuple_keys": [key]}, "authorization_model_id": model_id})
        if status != 200 and "already exists" not in json.dumps(body):
            die(f"write tuple {key}: {status} {body}")

    print(f"STORE_ID={store_id}")
    print(f"MODEL_ID={model_id}")


if __name__ == "__main__":
    main()
