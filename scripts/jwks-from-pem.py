import base64, json, sys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa, ec, ed25519
def b64(n, length=None):
    if isinstance(n, int):
        length = length or (n.bit_length() + 7) // 8
        n = n.to_bytes(length, "big")
    return base64.urlsafe_b64encode(n).rstrip(b"=").decode()
def jwk(path, kid, alg):
    key = serialization.load_pem_private_key(open(path, "rb").read(), None)
    pub = key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        nums = pub.public_numbers()
        return {"kty": "RSA", "kid": kid, "use": "sig", "alg": alg, "n": b64(nums.n), "e": b64(nums.e)}
    if isinstance(pub, ec.EllipticCurvePublicKey):
        nums = pub.public_numbers()
        return {"kty": "EC", "kid": kid, "use": "sig", "alg": alg, "crv": "P-256", "x": b64(nums.x, 32), "y": b64(nums.y, 32)}
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kty": "OKP", "kid": kid, "use": "sig", "alg": alg, "crv": "Ed25519", "x": b64(raw)}
out, *specs = sys.argv[1:]
keys = [jwk(*s.split(",")) for s in specs]
json.dump({"keys": keys}, open(out, "w"), indent=2); open(out, "a").write("\n")
