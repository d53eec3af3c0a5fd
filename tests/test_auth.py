"""Tests for relayd.auth: API keys, bearer headers, consumer JWTs and principals (pure, no I/O)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from relayd.auth import (
    RIGHTS,
    ApiKeys,
    FailureLimiter,
    Principal,
    TokenAuthority,
    generate_api_key,
    hash_api_key,
    is_valid_stream_pattern,
    parse_bearer,
)
from relayd.errors import AuthError, ConfigError, ProtocolError, RelaydError

SECRET = "s3cret-for-tests-0123456789abcdef-xyz"  # >= 32 bytes: no InsecureKeyLengthWarning
OTHER_SECRET = "another-secret-for-tests-0123456789abcdef"
NOW = 1_763_745_600.0


# --- helpers ----------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "streams": ["chat-42"],
        "rights": ["read"],
        "exp": int(NOW) + 300,
        "iat": int(NOW),
        "aud": "relayd",
    }
    for name, value in overrides.items():
        if value is _DROP:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


_DROP = object()


def _hs_token(secret: str = SECRET, **overrides: Any) -> str:
    return jwt.encode(_claims(**overrides), secret, algorithm="HS256")


def _pem_private(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def _pem_public(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def _refused(authority: TokenAuthority, token: str | None, code: str = "unauthorized") -> AuthError:
    with pytest.raises(AuthError) as info:
        authority.verify(token, now=NOW)
    assert info.value.code == code
    if token:
        assert token not in str(info.value)
    assert SECRET not in str(info.value)
    return info.value


@pytest.fixture
def hs() -> TokenAuthority:
    return TokenAuthority(secret=SECRET)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def rs(rsa_key: rsa.RSAPrivateKey) -> TokenAuthority:
    return TokenAuthority(algorithm="RS256", public_key=_pem_public(rsa_key), private_key=_pem_private(rsa_key))


# --- hash_api_key, generate_api_key -----------------------------------------------------------


def test_hash_api_key_format() -> None:
    """hash_api_key returns "sha256:" and 64 lowercase hex digits of the key's SHA-256."""
    digest = hash_api_key("abc")
    assert digest == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", hash_api_key(generate_api_key()))


def test_hash_api_key_hashes_utf8_bytes() -> None:
    """hash_api_key hashes the UTF-8 encoding of a non-ASCII key."""
    assert hash_api_key("clé-ключ") == "sha256:" + hashlib.sha256("clé-ключ".encode()).hexdigest()


def test_generate_api_key_shape_and_uniqueness() -> None:
    """generate_api_key returns "rk_" plus 43 URL-safe characters, different every call."""
    keys = {generate_api_key() for _ in range(20)}
    assert len(keys) == 20
    for key in keys:
        assert re.fullmatch(r"rk_[A-Za-z0-9_-]{43}", key)


# --- parse_bearer -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer abc", "abc"),
        ("BEARER abc", "abc"),
        ("  Bearer   abc  ", "abc"),
        ("Bearer\tabc", "abc"),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer   ", None),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearerabc", None),
        ("Bearer a b", None),
        ("abc", None),
    ],
)
def test_parse_bearer(header: str | None, expected: str | None) -> None:
    """parse_bearer returns the credential of a Bearer header (any scheme case), else None."""
    assert parse_bearer(header) == expected


# --- ApiKeys ----------------------------------------------------------------------------------


def test_api_keys_accepts_a_configured_plain_key() -> None:
    """A plain key given in secrets verifies."""
    key = generate_api_key()
    ApiKeys(secrets=[key]).verify(key)


def test_api_keys_accepts_a_key_given_by_hash() -> None:
    """A key whose hash is given in hashes verifies."""
    ApiKeys(hashes=[hash_api_key("producer-key-0123456789")]).verify("producer-key-0123456789")


def test_api_keys_accepts_hash_given_in_secrets() -> None:
    """A "sha256:" entry in secrets is used as a hash, not hashed again."""
    keys = ApiKeys(secrets=[hash_api_key("producer-key-0123456789")])
    keys.verify("producer-key-0123456789")
    with pytest.raises(AuthError):
        keys.verify(hash_api_key("producer-key-0123456789"))


def test_api_keys_accepts_any_of_several_keys() -> None:
    """Each of several configured keys verifies."""
    keys = ApiKeys(hashes=[hash_api_key("first-key-0123456789")], secrets=["second-key-0123456789"])
    keys.verify("first-key-0123456789")
    keys.verify("second-key-0123456789")


def test_api_keys_refuses_a_wrong_key_without_echoing_it() -> None:
    """A wrong key is refused with unauthorized "invalid API key", and the key is not echoed."""
    with pytest.raises(AuthError) as info:
        ApiKeys(secrets=["right-key-0123456789"]).verify("wrong-key-0123456789")
    assert info.value.code == "unauthorized"
    assert info.value.message == "invalid API key"
    assert "wrong-key" not in str(info.value)
    assert info.value.http_status == 401


@pytest.mark.parametrize("presented", [None, ""])
def test_api_keys_refuses_a_missing_key(presented: str | None) -> None:
    """A missing or empty key is refused with unauthorized "missing API key"."""
    with pytest.raises(AuthError) as info:
        ApiKeys(secrets=["right-key-0123456789"]).verify(presented)
    assert (info.value.code, info.value.message) == ("unauthorized", "missing API key")


def test_api_keys_without_keys_is_false_and_refuses_everything() -> None:
    """ApiKeys with no key is falsy and refuses every key."""
    keys = ApiKeys()
    assert not keys
    assert ApiKeys(secrets=["k-0123456789abcdef"])
    with pytest.raises(AuthError):
        keys.verify("anything-0123456789")


def test_api_keys_keeps_only_hashes() -> None:
    """ApiKeys keeps no plain key: neither its repr nor its state contains it."""
    keys = ApiKeys(secrets=["plain-secret-key-0123456789"])
    assert "plain-secret-key" not in repr(keys)
    assert all(b"plain-secret-key" not in h for h in keys._hashes)


@pytest.mark.parametrize("bad", ["sha256:xyz", "md5:" + "0" * 32, "sha256:" + "0" * 63])
def test_api_keys_rejects_malformed_hashes(bad: str) -> None:
    """A malformed hash in hashes or secrets raises ConfigError."""
    with pytest.raises(ConfigError):
        ApiKeys(hashes=[bad])
    if bad.startswith("sha256:"):
        with pytest.raises(ConfigError):
            ApiKeys(secrets=[bad])


# --- Principal --------------------------------------------------------------------------------


def _principal(*streams: str, rights: frozenset[str] = frozenset({"read"})) -> Principal:
    return Principal(streams=streams, rights=rights, expires_at=NOW + 60)


def test_principal_exact_id_matches_only_itself() -> None:
    """An exact stream id allows that stream and no other."""
    p = _principal("chat-42")
    assert p.allows("chat-42")
    assert not p.allows("chat-420")
    assert not p.allows("chat-4")


def test_principal_prefix_matches_its_tail_only() -> None:
    """Prefix "user-7/*" allows "user-7/a" but not "user-70" nor "user-7"."""
    p = _principal("user-7/*")
    assert p.allows("user-7/a")
    assert p.allows("user-7/a/b:c")
    assert not p.allows("user-70")
    assert not p.allows("user-7")
    assert not p.allows("user-8/a")


def test_principal_star_allows_every_stream() -> None:
    """ "*" alone allows every stream."""
    p = _principal("*")
    for stream in ("a", "chat-42", "user-7/x", "x" * 200):
        assert p.allows(stream)


def test_principal_rights_read_vs_cancel() -> None:
    """A read-only token cannot cancel; a token with cancel can."""
    reader = _principal("chat-42")
    assert reader.allows("chat-42", "read")
    assert not reader.allows("chat-42", "cancel")
    canceller = _principal("chat-42", rights=frozenset({"read", "cancel"}))
    assert canceller.allows("chat-42", "cancel")


def test_principal_require_raises_forbidden() -> None:
    """require raises AuthError forbidden (HTTP 403, close 4003) naming the right and stream."""
    p = _principal("chat-42")
    p.require("chat-42")
    with pytest.raises(AuthError) as info:
        p.require("chat-42", "cancel")
    assert info.value.code == "forbidden"
    assert info.value.message == "token does not allow cancel on stream chat-42"
    assert info.value.http_status == 403
    assert info.value.close_code == 4003
    with pytest.raises(AuthError, match="token does not allow read on stream other"):
        p.require("other")


@pytest.mark.parametrize(
    ("pattern", "valid"),
    [
        ("chat-42", True),
        ("a.b:c/d@e=f_g", True),
        ("user-7/*", True),
        ("*", True),
        ("x" * 200, True),
        ("x" * 199 + "*", True),
        ("x" * 201, False),
        ("x" * 200 + "*", False),
        ("", False),
        ("a*b", False),
        ("**", False),
        ("chat 42", False),
        ("chat{42}", False),
        ("chat-42\n", False),
        (42, False),
    ],
)
def test_stream_pattern_validation(pattern: object, valid: bool) -> None:
    """Stream claims are ids of 1-200 allowed characters, an id prefix plus "*", or "*"."""
    assert is_valid_stream_pattern(pattern) is valid


# --- TokenAuthority: HS256 round trip and minting ---------------------------------------------


def test_hs256_mint_verify_round_trip(hs: TokenAuthority) -> None:
    """A minted HS256 token verifies into a Principal with its streams, rights and subject."""
    token, expires_at = hs.mint(["chat-42", "user-7/*"], ["read", "cancel"], 60, "u7", now=NOW)
    assert expires_at == int(NOW) + 60
    p = hs.verify(token, now=NOW)
    assert p == Principal(
        streams=("chat-42", "user-7/*"),
        rights=frozenset({"read", "cancel"}),
        expires_at=float(expires_at),
        subject="u7",
    )
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256"
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="relayd", options={"verify_exp": False})
    assert claims["aud"] == "relayd"
    assert claims["iat"] == int(NOW)


def test_mint_defaults_to_read_and_default_ttl(hs: TokenAuthority) -> None:
    """Without rights or ttl_s, a token grants read for default_ttl_s seconds."""
    token, expires_at = hs.mint(["chat-42"], now=NOW)
    assert expires_at == int(NOW) + 300
    assert hs.verify(token, now=NOW).rights == frozenset({"read"})


def test_mint_caps_ttl_at_max_ttl(hs: TokenAuthority) -> None:
    """A ttl_s above max_ttl_s is capped at max_ttl_s."""
    token, expires_at = hs.mint(["chat-42"], ttl_s=100_000, now=NOW)
    assert expires_at == int(NOW) + 3600
    assert hs.verify(token, now=NOW).expires_at == int(NOW) + 3600
    short = TokenAuthority(secret=SECRET, default_ttl_s=10, max_ttl_s=20)
    assert short.mint(["a"], ttl_s=30, now=NOW)[1] == int(NOW) + 20


def test_mint_uses_the_clock_without_now(hs: TokenAuthority) -> None:
    """Without now=, mint and verify use the current time."""
    token, _ = hs.mint(["chat-42"])
    assert hs.verify(token).allows("chat-42")


def test_mint_includes_issuer_when_configured() -> None:
    """An authority with an issuer puts iss in the tokens it mints, and they verify."""
    authority = TokenAuthority(secret=SECRET, issuer="https://backend.example")
    token, _ = authority.mint(["chat-42"], now=NOW)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["iss"] == "https://backend.example"
    authority.verify(token, now=NOW)


@pytest.mark.parametrize(
    "streams",
    [[], "chat-42", ["chat 42"], ["a*b"], [""], [42], ["x" * 201], None],
)
def test_mint_rejects_bad_streams(hs: TokenAuthority, streams: Any) -> None:
    """mint refuses streams that are not a non-empty list of ids or prefixes with bad_frame."""
    with pytest.raises(ProtocolError) as info:
        hs.mint(streams, now=NOW)
    assert info.value.code == "bad_frame"


@pytest.mark.parametrize("rights", [[], "read", ["write"], ["read", "admin"], [None]])
def test_mint_rejects_bad_rights(hs: TokenAuthority, rights: Any) -> None:
    """mint refuses rights that are not a non-empty subset of RIGHTS with bad_frame."""
    with pytest.raises(ProtocolError) as info:
        hs.mint(["chat-42"], rights, now=NOW)
    assert info.value.code == "bad_frame"


@pytest.mark.parametrize("ttl_s", [0, -5, True, 1.5, "60"])
def test_mint_rejects_bad_ttl(hs: TokenAuthority, ttl_s: Any) -> None:
    """mint refuses a ttl_s that is not a positive integer with bad_frame."""
    with pytest.raises(ProtocolError) as info:
        hs.mint(["chat-42"], ttl_s=ttl_s, now=NOW)
    assert info.value.code == "bad_frame"


def test_mint_without_signing_key_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    """mint without a secret (HS) or private key (RS) raises AuthError unauthorized."""
    verify_only = TokenAuthority(algorithm="RS256", public_key=_pem_public(rsa_key))
    for authority in (TokenAuthority(), verify_only):
        with pytest.raises(AuthError, match="cannot mint without a signing key") as info:
            authority.mint(["chat-42"], now=NOW)
        assert isinstance(info.value, RelaydError)
        assert info.value.code == "unauthorized"


def test_rights_constant() -> None:
    """RIGHTS is exactly read and cancel."""
    assert frozenset({"read", "cancel"}) == RIGHTS


# --- TokenAuthority.verify: the refusal matrix ------------------------------------------------


@pytest.mark.parametrize("token", [None, ""])
def test_verify_missing_token(hs: TokenAuthority, token: str | None) -> None:
    """A missing or empty token is refused with unauthorized "missing token"."""
    assert _refused(hs, token).message == "missing token"


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        "a.b",
        "a.b.c.d",
        "!!!.@@@.###",
        "eyJhbGciOiJIUzI1NiJ9.%%%%.sig",
        _b64(b"not json") + "." + _b64(b"{}") + ".c2ln",
        _b64(b'{"alg":"HS256","typ":"JWT"}') + "." + _b64(b"[1,2]") + ".c2ln",
        _b64(b"[" * 100_000) + "." + _b64(b"{}") + ".c2ln",
    ],
)
def test_verify_malformed_token(hs: TokenAuthority, token: str) -> None:
    """Something that is not a JWT (bad segments, garbage base64, bad JSON) is unauthorized."""
    _refused(hs, token)


def test_verify_tampered_payload(hs: TokenAuthority) -> None:
    """A token whose payload was changed (to widen its streams) fails the signature check."""
    header, _, signature = _hs_token().split(".")
    forged_payload = _b64(json.dumps(_claims(streams=["*"])).encode())
    error = _refused(hs, f"{header}.{forged_payload}.{signature}")
    assert error.message == "token signature is invalid"
    assert isinstance(error.__cause__, jwt.InvalidSignatureError)


def test_verify_tampered_signature(hs: TokenAuthority) -> None:
    """A token whose signature was altered is unauthorized."""
    header, payload, signature = _hs_token().split(".")
    flipped = ("A" if signature[5] != "A" else "B").join([signature[:5], signature[6:]])
    assert _refused(hs, f"{header}.{payload}.{flipped}").message == "token signature is invalid"


def test_verify_signed_with_another_secret(hs: TokenAuthority) -> None:
    """A token signed with another secret is unauthorized."""
    assert _refused(hs, _hs_token(OTHER_SECRET)).message == "token signature is invalid"


def test_verify_refuses_alg_none(hs: TokenAuthority) -> None:
    """An unsigned alg=none token is refused, even with valid claims."""
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(_claims(streams=["*"])).encode())
    by_pyjwt = jwt.encode(_claims(), None, algorithm="none")  # type: ignore[arg-type]
    for token in (f"{header}.{payload}.", by_pyjwt):
        error = _refused(hs, token)
        assert "algorithm not allowed" in error.message


def test_verify_refuses_another_hs_algorithm(hs: TokenAuthority) -> None:
    """With HS256 configured, a token signed HS512 with the same secret is refused."""
    token = jwt.encode(_claims(), SECRET * 2, algorithm="HS512")
    assert "algorithm not allowed" in _refused(hs, token).message


def test_verify_refuses_hs_token_when_rs256_configured(rs: TokenAuthority, rsa_key: rsa.RSAPrivateKey) -> None:
    """With RS256 configured, HS256 tokens are refused, including the public-key-as-secret trick."""
    assert "expected RS256" in _refused(rs, _hs_token()).message
    # Algorithm confusion: HMAC keyed with the (public) RSA key PEM.
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(_claims(streams=["*"])).encode())
    mac = hmac.new(_pem_public(rsa_key).encode(), f"{header}.{payload}".encode(), hashlib.sha256)
    _refused(rs, f"{header}.{payload}.{_b64(mac.digest())}")


def test_verify_expired_token(hs: TokenAuthority) -> None:
    """A token whose exp has passed is refused with token_expired (close 4002)."""
    token, expires_at = hs.mint(["chat-42"], ttl_s=60, now=NOW)
    hs.verify(token, now=expires_at - 1)
    for later in (expires_at, expires_at + 1, expires_at + 10_000):
        with pytest.raises(AuthError) as info:
            hs.verify(token, now=later)
        assert info.value.code == "token_expired"
        assert info.value.close_code == 4002
        assert info.value.http_status == 401


def test_verify_leeway_tolerates_small_clock_skew() -> None:
    """leeway_s accepts a token that expired less than leeway_s seconds ago."""
    authority = TokenAuthority(secret=SECRET, leeway_s=30)
    token, expires_at = authority.mint(["chat-42"], ttl_s=60, now=NOW)
    authority.verify(token, now=expires_at + 29)
    with pytest.raises(AuthError, match="token_expired"):
        authority.verify(token, now=expires_at + 31)


def test_verify_expired_token_with_bad_signature_is_unauthorized(hs: TokenAuthority) -> None:
    """Expiry is only reported after the signature checks out."""
    token = _hs_token(OTHER_SECRET, exp=int(NOW) - 100)
    _refused(hs, token, "unauthorized")


def test_verify_wrong_audience(hs: TokenAuthority) -> None:
    """A token for another audience is unauthorized."""
    assert _refused(hs, _hs_token(aud="other-service")).message == "token audience is not accepted"


def test_verify_missing_audience(hs: TokenAuthority) -> None:
    """A token with no aud claim is unauthorized."""
    assert _refused(hs, _hs_token(aud=_DROP)).message == "token has no aud claim"


def test_verify_audience_list_containing_relayd(hs: TokenAuthority) -> None:
    """An aud list that contains the configured audience is accepted."""
    hs.verify(_hs_token(aud=["other", "relayd"]), now=NOW)


def test_verify_wrong_issuer_when_issuer_configured() -> None:
    """With an issuer configured, a token from another issuer or with no iss is unauthorized."""
    authority = TokenAuthority(secret=SECRET, issuer="https://backend.example")
    wrong = _refused(authority, _hs_token(iss="https://evil.example"))
    assert wrong.message == "token issuer is not accepted"
    assert _refused(authority, _hs_token()).message == "token has no iss claim"
    authority.verify(_hs_token(iss="https://backend.example"), now=NOW)


def test_verify_ignores_issuer_when_not_configured(hs: TokenAuthority) -> None:
    """Without a configured issuer, any iss claim is accepted."""
    hs.verify(_hs_token(iss="whoever"), now=NOW)


@pytest.mark.parametrize("exp", [_DROP, None])
def test_verify_missing_exp(hs: TokenAuthority, exp: Any) -> None:
    """A token with no exp (or exp null) is unauthorized, never accepted as eternal."""
    assert _refused(hs, _hs_token(exp=exp)).message == "token has no exp claim"


@pytest.mark.parametrize("exp", ["soon", True, [1], 10**400])
def test_verify_exp_not_a_number(hs: TokenAuthority, exp: Any) -> None:
    """A token whose exp is not a finite number is unauthorized."""
    assert _refused(hs, _hs_token(exp=exp)).message == "token exp claim must be a number"


def test_verify_nbf_and_iat_in_the_future(hs: TokenAuthority) -> None:
    """A token not valid yet (nbf) or issued in the future (iat) is unauthorized."""
    assert "nbf" in _refused(hs, _hs_token(nbf=int(NOW) + 60)).message
    assert "iat" in _refused(hs, _hs_token(iat=int(NOW) + 60)).message
    assert "iat" in _refused(hs, _hs_token(iat="yesterday")).message
    hs.verify(_hs_token(nbf=int(NOW) - 1), now=NOW)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"streams": "chat-42"}, "token streams claim must be a non-empty list"),
        ({"streams": {"chat-42": True}}, "token streams claim must be a non-empty list"),
        ({"streams": []}, "token streams claim must be a non-empty list"),
        ({"streams": _DROP}, "token has no streams claim"),
        ({"streams": ["chat-42", 7]}, "token streams[1] is not a valid stream id or prefix"),
        ({"streams": ["chat 42"]}, "token streams[0] is not a valid stream id or prefix"),
        ({"streams": ["a*b"]}, "token streams[0] is not a valid stream id or prefix"),
        ({"rights": ["read", "write"]}, "token rights[1] is not a known right (cancel, read)"),
        ({"rights": "read"}, "token rights claim must be a non-empty list"),
        ({"rights": []}, "token rights claim must be a non-empty list"),
        ({"rights": [None]}, "token rights[0] is not a known right (cancel, read)"),
        ({"sub": 42}, "token sub claim must be a string"),
    ],
)
def test_verify_bad_claim_shapes(hs: TokenAuthority, overrides: dict[str, Any], message: str) -> None:
    """A token whose streams, rights or sub claims have the wrong shape is unauthorized."""
    assert _refused(hs, _hs_token(**overrides)).message == message


def test_verify_rights_default_to_read(hs: TokenAuthority) -> None:
    """A token without a rights claim grants read only."""
    p = hs.verify(_hs_token(rights=_DROP), now=NOW)
    assert p.rights == frozenset({"read"})
    assert p.allows("chat-42")
    assert not p.allows("chat-42", "cancel")


def test_verify_token_from_another_library_shape(hs: TokenAuthority) -> None:
    """A minimal backend-minted token (streams, exp, aud) verifies."""
    token = jwt.encode({"streams": ["user-7/*"], "exp": int(NOW) + 5, "aud": "relayd"}, SECRET, algorithm="HS256")
    p = hs.verify(token, now=NOW)
    assert p.allows("user-7/a")
    assert not p.allows("user-70")
    assert p.subject is None


def test_verify_without_key_is_refused() -> None:
    """An authority built without a secret refuses tokens instead of accepting them."""
    _refused(TokenAuthority(), _hs_token())


# --- RS256 and ES256 --------------------------------------------------------------------------


def test_rs256_round_trip(rs: TokenAuthority, rsa_key: rsa.RSAPrivateKey) -> None:
    """An RS256 token minted with the private key verifies with the public key."""
    token, _ = rs.mint(["chat-42"], ["read", "cancel"], now=NOW)
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    verifier = TokenAuthority(algorithm="RS256", public_key=_pem_public(rsa_key))
    assert verifier.verify(token, now=NOW).allows("chat-42", "cancel")


def test_rs256_refuses_token_signed_by_another_key(rs: TokenAuthority) -> None:
    """An RS256 token signed by another RSA key is unauthorized."""
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(_claims(), _pem_private(other), algorithm="RS256")
    assert _refused(rs, token).message == "token signature is invalid"


def test_es256_round_trip(ec_key: ec.EllipticCurvePrivateKey) -> None:
    """An ES256 token minted with the private key verifies with the public key."""
    minter = TokenAuthority(algorithm="ES256", private_key=_pem_private(ec_key))
    verifier = TokenAuthority(algorithm="ES256", public_key=_pem_public(ec_key))
    token, _ = minter.mint(["user-7/*"], now=NOW)
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    assert verifier.verify(token, now=NOW).allows("user-7/x")
    assert minter.verify(token, now=NOW).allows("user-7/x")
    other = TokenAuthority(algorithm="ES256", public_key=_pem_public(ec.generate_private_key(ec.SECP256R1())))
    _refused(other, token)


def test_es256_refuses_rs256_token(ec_key: ec.EllipticCurvePrivateKey, rs: TokenAuthority) -> None:
    """With ES256 configured, an RS256 token is refused."""
    token, _ = rs.mint(["chat-42"], now=NOW)
    verifier = TokenAuthority(algorithm="ES256", public_key=_pem_public(ec_key))
    assert "expected ES256" in _refused(verifier, token).message


# --- configuration errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"algorithm": "none", "secret": SECRET},
        {"algorithm": "PS256", "secret": SECRET},
        {"secret": "short"},
        {"algorithm": "HS512", "secret": SECRET},
        {"secret": SECRET, "audience": ""},
        {"secret": SECRET, "default_ttl_s": 0},
        {"secret": SECRET, "default_ttl_s": 7200, "max_ttl_s": 3600},
        {"secret": SECRET, "leeway_s": -1},
        {"algorithm": "RS256", "public_key": "not a pem"},
        {
            "algorithm": "RS256",
            "private_key": "-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----\n",
        },
    ],
)
def test_bad_configuration_raises_config_error(kwargs: dict[str, Any]) -> None:
    """A bad algorithm, weak secret, empty audience, bad ttl or unparsable key is a ConfigError."""
    with pytest.raises(ConfigError) as info:
        TokenAuthority(**kwargs)
    assert SECRET not in str(info.value)


def test_config_rejects_wrong_key_kinds(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> None:
    """A public key given as private key, an RSA key for ES256, or a PEM as HS secret is refused."""
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    cases: list[tuple[dict[str, str], str]] = [
        ({"algorithm": "RS256", "private_key": _pem_public(rsa_key)}, "auth.jwt_private_key"),
        ({"algorithm": "ES256", "public_key": _pem_public(rsa_key)}, "auth.jwt_public_key_file"),
        ({"secret": _pem_public(ec_key)}, "auth.jwt_secret"),
        ({"algorithm": "RS256", "public_key": _pem_public(small)}, "auth.jwt_public_key_file"),
    ]
    for kwargs, key in cases:
        with pytest.raises(ConfigError) as info:
            TokenAuthority(**kwargs)  # type: ignore[arg-type]
        assert info.value.key == key


# --- per-key stream scopes and the failure limit (issue 9, item 26) -----------------------------

KEY_A, KEY_B = "rk_tenant_a_key_0123456789", "rk_tenant_b_key_0123456789"


def test_a_scoped_key_may_use_only_its_streams_and_an_unscoped_key_all() -> None:
    keys = ApiKeys(secrets=[KEY_A, KEY_B], streams=[f"{hash_api_key(KEY_A)} tenant-a/* shared"])
    scope = keys.verify(KEY_A)
    assert scope is not None
    assert scope.allows("tenant-a/chat-1") and scope.allows("shared") and scope.allows("tenant-a/")
    assert not scope.allows("tenant-b/chat-1") and not scope.allows("shared-2") and not scope.allows("tenant-")
    assert keys.verify(KEY_B) is None  # no entry: every stream


def test_a_scoped_key_covers_only_patterns_inside_its_own() -> None:
    scope = ApiKeys(secrets=[KEY_A], streams=[f"{hash_api_key(KEY_A)} tenant-a/* shared"]).verify(KEY_A)
    assert scope is not None
    assert scope.covers("tenant-a/*") and scope.covers("tenant-a/chat-*") and scope.covers("tenant-a/x")
    assert scope.covers("shared")
    assert not scope.covers("*") and not scope.covers("tenant-*") and not scope.covers("shared*")


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("{a}", "and the stream ids"),
        ("{a} *", "is not a stream id"),
        ("{a} ok bad!id", "is not a stream id"),
        ("sha256:" + "0" * 64 + " x", "names no configured API key"),
        ("sha256:nothex x", "must be a hash"),
    ],
)
def test_bad_scope_entries_are_config_errors_naming_the_key(entry: str, problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        ApiKeys(secrets=[KEY_A], streams=[entry.format(a=hash_api_key(KEY_A))])
    assert exc.value.key.startswith("auth.api_key_streams") and problem in str(exc.value), exc.value


def test_failure_limiter_allows_a_burst_then_one_per_interval() -> None:
    limiter = FailureLimiter(max_failures=3, window_s=30.0)  # a failure forgiven every 10 s
    for _ in range(3):
        assert limiter.retry_after("1.2.3.4", 100.0) == 0
        limiter.failed("1.2.3.4", 100.0)
    assert limiter.retry_after("1.2.3.4", 100.0) == pytest.approx(10.0)
    assert limiter.retry_after("5.6.7.8", 100.0) == 0  # per address
    assert limiter.retry_after("1.2.3.4", 105.0) == pytest.approx(5.0)
    assert limiter.retry_after("1.2.3.4", 110.0) == 0
    limiter.failed("1.2.3.4", 110.0)
    assert limiter.retry_after("1.2.3.4", 110.0) == pytest.approx(10.0)


def test_failure_limiter_is_bounded_in_memory_and_can_be_off() -> None:
    limiter = FailureLimiter(max_failures=1, window_s=60.0, max_addresses=100)
    for i in range(1000):
        limiter.failed(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(limiter._buckets) == 100
    assert limiter.retry_after("10.0.3.231", 0.0) > 0  # the most recent ones are kept
    off = FailureLimiter(max_failures=0, window_s=60.0)
    for _ in range(100):
        off.failed("1.2.3.4", 0.0)
    assert off.retry_after("1.2.3.4", 0.0) == 0 and not off._buckets
