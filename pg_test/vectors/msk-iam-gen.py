#!/usr/bin/env python3
"""Generate reference MSK IAM SASL (OAUTHBEARER) token vectors using AWS's own
`aws-msk-iam-sasl-signer-python` library, with the signing clock frozen.

Run with:  /tmp/mskvec/venv/bin/python /tmp/mskvec/gen.py

The library does the signing (generate_auth_token_from_credentials_provider).
We only:
  * freeze the clock botocore's SigV4 signer reads (botocore.auth.get_current_datetime),
  * capture botocore's own CanonicalRequest / StringToSign debug log lines,
  * independently rebuild canonical request / string-to-sign / signature by hand
    (hashlib + hmac only, no botocore) and assert they match byte for byte,
  * independently rebuild the whole token by hand and assert it matches.
"""
import base64
import datetime
import hashlib
import hmac
import importlib.metadata
import json
import logging
import sys
from urllib.parse import quote, urlsplit

import botocore
import botocore.auth
from botocore.credentials import CredentialProvider, Credentials

import aws_msk_iam_sasl_signer
from aws_msk_iam_sasl_signer import MSKAuthTokenProvider

FIXED_NOW = datetime.datetime(2026, 1, 2, 3, 4, 5)  # naive UTC, like botocore's own


def _frozen_now(remove_tzinfo=True):
    if remove_tzinfo:
        return FIXED_NOW
    return FIXED_NOW.replace(tzinfo=datetime.timezone.utc)


# botocore.auth does `from botocore.compat import get_current_datetime`, and
# SigV4Auth.add_auth calls the module-level name -> patch it there.
botocore.auth.get_current_datetime = _frozen_now


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


_cap = _Capture()
_auth_logger = logging.getLogger("botocore.auth")
_auth_logger.setLevel(logging.DEBUG)
_auth_logger.addHandler(_cap)
_auth_logger.propagate = False


class StaticProvider(CredentialProvider):
    METHOD = "static-test"
    CANONICAL_NAME = "StaticTest"

    def __init__(self, ak, sk, token=None):
        super().__init__()
        self._c = Credentials(ak, sk, token)

    def load(self):
        return self._c


AK = "AKIAIOSFODNN7EXAMPLE"
SK = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
VECTORS = [
    ("A", "us-east-1", AK, SK, None),
    ("B", "eu-west-1", AK, SK, "IQoJb3JpZ2luX2VjEXAMPLETOKEN/with+slash="),
]


# ---------------------------------------------------------------- independent
def enc(s):
    # SigV4 URI encoding: unreserved = A-Z a-z 0-9 - _ . ~
    return quote(str(s), safe="-_.~")


def hand_build(region, ak, sk, token, amz_date, expires=900, ua=None):
    """Pure re-implementation (no botocore) of what the library produces."""
    date = amz_date[:8]
    host = f"kafka.{region}.amazonaws.com"
    scope = f"{date}/{region}/kafka-cluster/aws4_request"
    # URL query order as emitted by botocore: op params, then auth params in
    # insertion order, then X-Amz-Signature, then User-Agent.
    params = [
        ("Action", "kafka-cluster:Connect"),
        ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
        ("X-Amz-Credential", f"{ak}/{scope}"),
        ("X-Amz-Date", amz_date),
        ("X-Amz-Expires", str(expires)),
        ("X-Amz-SignedHeaders", "host"),
    ]
    if token is not None:
        params.append(("X-Amz-Security-Token", token))
    enc_pairs = [(enc(k), enc(v)) for k, v in params]
    canonical_qs = "&".join(f"{k}={v}" for k, v in sorted(enc_pairs))
    canonical_request = "\n".join([
        "GET",
        "/",
        canonical_qs,
        f"host:{host}\n",
        "host",
        hashlib.sha256(b"").hexdigest(),
    ])
    sts = "\n".join([
        "AWS4-HMAC-SHA256",
        amz_date,
        scope,
        hashlib.sha256(canonical_request.encode()).hexdigest(),
    ])

    def h(k, m):
        return hmac.new(k, m.encode(), hashlib.sha256).digest()

    k = h(("AWS4" + sk).encode(), date)
    k = h(k, region)
    k = h(k, "kafka-cluster")
    k = h(k, "aws4_request")
    sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
    url = (f"https://{host}/?"
           + "&".join(f"{k}={v}" for k, v in enc_pairs)
           + f"&X-Amz-Signature={sig}")
    if ua is not None:
        # library appends via urllib.parse.urlencode (quote_plus, safe='')
        url += "&User-Agent=" + quote(ua, safe="").replace("%20", "+")
    token_b64 = base64.urlsafe_b64encode(url.encode()).decode().rstrip("=")
    return dict(canonical_request=canonical_request, string_to_sign=sts,
                signature=sig, url=url, token=token_b64)


def b64url_decode_nopad(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)).decode()


def main():
    lib_version = importlib.metadata.version("aws-msk-iam-sasl-signer-python")
    ua = MSKAuthTokenProvider.__get_user_agent__()
    out = {
        "python": sys.version.split()[0],
        "aws_msk_iam_sasl_signer_version": lib_version,
        "aws_msk_iam_sasl_signer___version__": aws_msk_iam_sasl_signer.__version__,
        "botocore_version": botocore.__version__,
        "user_agent": ua,
        "vectors": [],
    }
    for name, region, ak, sk, tok in VECTORS:
        _cap.records.clear()
        token, expiry_ms = MSKAuthTokenProvider.generate_auth_token_from_credentials_provider(
            region, StaticProvider(ak, sk, tok))
        logged = list(_cap.records)
        cr_log = [m for m in logged if m.startswith("CanonicalRequest:\n")]
        sts_log = [m for m in logged if m.startswith("StringToSign:\n")]
        sig_log = [m for m in logged if m.startswith("Signature:\n")]
        assert len(cr_log) == len(sts_log) == len(sig_log) == 1, logged
        cr_lib = cr_log[0][len("CanonicalRequest:\n"):]
        sts_lib = sts_log[0][len("StringToSign:\n"):]
        sig_lib = sig_log[0][len("Signature:\n"):]

        url = b64url_decode_nopad(token)
        # signature in URL
        q = dict(p.split("=", 1) for p in urlsplit(url).query.split("&"))
        sig_url = q["X-Amz-Signature"]
        amz_date = q["X-Amz-Date"]
        assert amz_date == "20260102T030405Z", amz_date

        hb = hand_build(region, ak, sk, tok, amz_date, ua=ua)
        assert hb["canonical_request"] == cr_lib, (hb["canonical_request"], cr_lib)
        assert hb["string_to_sign"] == sts_lib
        assert hb["signature"] == sig_lib == sig_url
        assert hb["url"] == url, (hb["url"], url)
        assert hb["token"] == token
        exp_expected = int(datetime.datetime(2026, 1, 2, 3, 4, 5,
                           tzinfo=datetime.timezone.utc).timestamp() + 900) * 1000
        assert expiry_ms == exp_expected, (expiry_ms, exp_expected)
        # determinism: generate again, same token
        token2, _ = MSKAuthTokenProvider.generate_auth_token_from_credentials_provider(
            region, StaticProvider(ak, sk, tok))
        assert token2 == token

        out["vectors"].append(dict(
            name=name, region=region, access_key=ak, secret_key=sk,
            session_token=tok, signing_time="2026-01-02T03:04:05Z",
            token=token, token_len=len(token), url=url, expiry_ms=expiry_ms,
            canonical_request=cr_lib, string_to_sign=sts_lib,
            signature=sig_url,
        ))
    with open("/tmp/mskvec/out.json", "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    with open("/tmp/mskvec/VECTORS.md", "w") as f:
        f.write(render_md(out))
    print("ALL CHECKS PASSED; wrote /tmp/mskvec/out.json and /tmp/mskvec/VECTORS.md",
          file=sys.stderr)


def rust_lit(s):
    return json.dumps(s)  # JSON escaping == valid Rust "..." literal here (ASCII only)


def render_md(out):
    L = []
    a = L.append
    a("# AWS MSK IAM SASL signer - reference test vectors\n")
    a("Generated by `/tmp/mskvec/gen.py` using AWS's own Python signer library; "
      "the library did the signing via "
      "`MSKAuthTokenProvider.generate_auth_token_from_credentials_provider(region, provider)` "
      "with a `botocore.credentials.Credentials` object. The only patch was "
      "`botocore.auth.get_current_datetime`, frozen to 2026-01-02T03:04:05Z.\n")
    a("| item | value |\n|---|---|")
    a(f"| aws-msk-iam-sasl-signer-python | `{out['aws_msk_iam_sasl_signer_version']}` |")
    a(f"| botocore | `{out['botocore_version']}` |")
    a(f"| Python | `{out['python']}` |")
    a(f"| User-Agent value (raw) | `{out['user_agent']}` |")
    a("| User-Agent as it appears in the URL | `User-Agent=aws-msk-iam-sasl-signer-python%2F1.0.2` |")
    a("")
    a(ALGO_MD)
    for v in out["vectors"]:
        a(f"## Vector {v['name']}\n")
        a("Inputs:\n")
        a(f"- region: `{v['region']}`")
        a(f"- access key: `{v['access_key']}`")
        a(f"- secret key: `{v['secret_key']}`")
        a(f"- session token: " + (f"`{v['session_token']}`" if v['session_token'] else "none (`None`)"))
        a(f"- signing time: `{v['signing_time']}` (X-Amz-Date `20260102T030405Z`)\n")
        a(f"Expiry returned by the library (ms): `{v['expiry_ms']}` "
          f"(= 1767323045 s signing time + 900 s, times 1000)\n")
        a(f"Token ({v['token_len']} chars, base64url, no padding):\n")
        a("```\n" + v["token"] + "\n```\n")
        a("Decoded URL:\n")
        a("```\n" + v["url"] + "\n```\n")
        a("Canonical request (exactly as botocore logged it; note the blank line after the host header line):\n")
        a("```\n" + v["canonical_request"] + "\n```\n")
        a("String to sign:\n")
        a("```\n" + v["string_to_sign"] + "\n```\n")
        a(f"Signature: `{v['signature']}`\n")
        a("Same values as Rust string literals:\n")
        a("```rust")
        a(f"const TOKEN_{v['name']}: &str = {rust_lit(v['token'])};")
        a(f"const URL_{v['name']}: &str = {rust_lit(v['url'])};")
        a(f"const CANONICAL_REQUEST_{v['name']}: &str = {rust_lit(v['canonical_request'])};")
        a(f"const STRING_TO_SIGN_{v['name']}: &str = {rust_lit(v['string_to_sign'])};")
        a(f"const SIGNATURE_{v['name']}: &str = {rust_lit(v['signature'])};")
        a(f"const EXPIRY_MS_{v['name']}: i64 = {v['expiry_ms']};")
        a("```\n")
    a(VERIFY_MD)
    return "\n".join(L)


ALGO_MD = """## How the library builds the token (from MSKAuthTokenProvider.py 1.0.2 + botocore.auth)

1. Endpoint: `https://kafka.{region}.amazonaws.com/` (scheme `https`, host
   `kafka.<region>.amazonaws.com`, path `/`). There is no special case for China or GovCloud partitions:
   the host always ends in `.amazonaws.com`.
2. A `botocore.awsrequest.AWSRequest(method="GET", url=endpoint, params={"Action": "kafka-cluster:Connect"})`
   with no body and no headers.
3. Signed with `botocore.auth.SigV4QueryAuth(credentials, "kafka-cluster", region, expires=900)`
   (a presigned URL, signed through the query string):
   - service name / signing name: `kafka-cluster`; the credential scope is `YYYYMMDD/<region>/kafka-cluster/aws4_request`.
   - timestamp: `get_current_datetime()` (UTC), formatted as `%Y%m%dT%H%M%SZ`.
   - Query string of the URL, in this exact order (not sorted): the operation parameter first,
     then the auth parameters in insertion order:
     `Action`, `X-Amz-Algorithm=AWS4-HMAC-SHA256`, `X-Amz-Credential=<AK>/<scope>`, `X-Amz-Date`,
     `X-Amz-Expires=900`, `X-Amz-SignedHeaders=host`, and then, only if `credentials.token is not None`,
     `X-Amz-Security-Token=<token>`.
     Each key and value is percent-encoded with `quote(safe='-._~')`, which is RFC 3986 unreserved
     encoding, so `:` becomes `%3A`, `/` becomes `%2F`, `+` becomes `%2B`, and `=` becomes `%3D`.
   - **X-Amz-Security-Token is included in the signed query** (it is part of the canonical query
     string). It is not sent as a header.
   - Canonical query string: the already-encoded `k=v` pairs from the URL, sorted by (key, value).
     This puts `X-Amz-Security-Token` **before** `X-Amz-SignedHeaders` in the canonical request,
     while in the URL it comes **after** it.
   - Canonical URI `/`. Signed headers: only `host` (lowercase host, with no port for 443).
   - Payload hash: botocore's normal `SigV4Auth.payload()` is used, not `UNSIGNED-PAYLOAD`.
     Because the URL is https, there is no body, and `payload_signing_enabled` is at its default,
     it returns the SHA-256 of the empty string:
     `e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855`.
   - The signature is appended as `&X-Amz-Signature=<hex>` at the end of the signed query.
4. **After signing**, the library sets `request.params = {"User-Agent": "aws-msk-iam-sasl-signer-python/<version>"}`
   (the version comes from `importlib.metadata.version`, here `1.0.2`) and calls `request.prepare()`.
   This appends `&User-Agent=...`, encoded with `urllib.parse.urlencode` (quote_plus), to the URL.
   The User-Agent is therefore the **last** parameter, comes **after** X-Amz-Signature, and is
   **not signed**. Encoded, it is `User-Agent=aws-msk-iam-sasl-signer-python%2F1.0.2`.
5. Token = `base64.urlsafe_b64encode(url.encode("utf-8")).decode().rstrip("=")`. The alphabet is
   URL-safe (`-` and `_`), and the **padding is stripped**.
6. Expiry returned (ms) = (epoch seconds of the X-Amz-Date parsed back out of the URL, as UTC,
   plus 900) * 1000. The function returns the tuple `(token, expiry_ms)`.
"""

VERIFY_MD = """## How these vectors were verified

- The token and expiry come directly from the library call. A second call gives an identical token.
- The CanonicalRequest, StringToSign and Signature shown above were captured from botocore's own
  `botocore.auth` DEBUG log, emitted during the library's `add_auth` call.
- `gen.py` also rebuilds the canonical request, the string to sign, the SigV4 signing key chain
  (`AWS4`+secret -> date -> region -> `kafka-cluster` -> `aws4_request`), the HMAC-SHA256
  signature, the full URL and the base64url token by hand, using only `hashlib`, `hmac`,
  `urllib.parse.quote` and `base64` (no botocore). It asserts that every result matches the
  library's output byte for byte, and that the signature matches the `X-Amz-Signature` in the URL.
- As a separate one-off check (run by hand, not part of gen.py), the signature was recomputed with `openssl dgst -sha256 -mac HMAC` from the
  canonical request and string to sign shown above. It matched for both vectors.
"""


if __name__ == "__main__":
    main()
