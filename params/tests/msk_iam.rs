//! MSK IAM tokens against AWS's own signer.

use base64::Engine;
use pg_outbox_params::oauth::{self, Credentials};

// Made by AWS's own signer (aws-msk-iam-sasl-signer-python 1.0.2, botocore
// 1.44.8) with its clock frozen at 2026-01-02T03:04:05Z; see
// pg_test/vectors/msk-iam.md for how.
const UA: &str = "aws-msk-iam-sasl-signer-python/1.0.2";
const NOW: u64 = 1_767_323_045;
const TOKEN_A: &str = "aHR0cHM6Ly9rYWZrYS51cy1lYXN0LTEuYW1hem9uYXdzLmNvbS8_QWN0aW9uPWthZmthLWNsdXN0ZXIlM0FDb25uZWN0JlgtQW16LUFsZ29yaXRobT1BV1M0LUhNQUMtU0hBMjU2JlgtQW16LUNyZWRlbnRpYWw9QUtJQUlPU0ZPRE5ON0VYQU1QTEUlMkYyMDI2MDEwMiUyRnVzLWVhc3QtMSUyRmthZmthLWNsdXN0ZXIlMkZhd3M0X3JlcXVlc3QmWC1BbXotRGF0ZT0yMDI2MDEwMlQwMzA0MDVaJlgtQW16LUV4cGlyZXM9OTAwJlgtQW16LVNpZ25lZEhlYWRlcnM9aG9zdCZYLUFtei1TaWduYXR1cmU9NmMwNmRkOWZlOGQzMDkxMjEzMWVmOTUzNDEzYWZhNmU4YTFiMjE1NWI2YjkzYzM5NjkwYzVlYWE1ZDRlN2I3ZCZVc2VyLUFnZW50PWF3cy1tc2staWFtLXNhc2wtc2lnbmVyLXB5dGhvbiUyRjEuMC4y";
const TOKEN_B: &str = "aHR0cHM6Ly9rYWZrYS5ldS13ZXN0LTEuYW1hem9uYXdzLmNvbS8_QWN0aW9uPWthZmthLWNsdXN0ZXIlM0FDb25uZWN0JlgtQW16LUFsZ29yaXRobT1BV1M0LUhNQUMtU0hBMjU2JlgtQW16LUNyZWRlbnRpYWw9QUtJQUlPU0ZPRE5ON0VYQU1QTEUlMkYyMDI2MDEwMiUyRmV1LXdlc3QtMSUyRmthZmthLWNsdXN0ZXIlMkZhd3M0X3JlcXVlc3QmWC1BbXotRGF0ZT0yMDI2MDEwMlQwMzA0MDVaJlgtQW16LUV4cGlyZXM9OTAwJlgtQW16LVNpZ25lZEhlYWRlcnM9aG9zdCZYLUFtei1TZWN1cml0eS1Ub2tlbj1JUW9KYjNKcFoybHVYMlZqRVhBTVBMRVRPS0VOJTJGd2l0aCUyQnNsYXNoJTNEJlgtQW16LVNpZ25hdHVyZT1iNzM2NjBlYjA0YTMwMjIxNzFkMGIyNmM0NWRjZmFjZmM2NzM0NWE5OTY0YWQzNmI5NDE4YTExODQyNTEwYzgxJlVzZXItQWdlbnQ9YXdzLW1zay1pYW0tc2FzbC1zaWduZXItcHl0aG9uJTJGMS4wLjI";

fn example_credentials(session_token: Option<&str>) -> Credentials {
    Credentials {
        access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
        secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
        session_token: session_token.map(str::to_string),
    }
}

#[test]
fn msk_iam_tokens_match_aws_signer_byte_for_byte() {
    let a = oauth::msk_iam_token("us-east-1", &example_credentials(None), NOW, UA);
    assert_eq!(a.value, TOKEN_A);
    assert_eq!(a.expires_ms, 1_767_323_945_000);
    assert_eq!(a.principal, "kafka-cluster");
    let b = oauth::msk_iam_token(
        "eu-west-1",
        &example_credentials(Some("IQoJb3JpZ2luX2VjEXAMPLETOKEN/with+slash=")),
        NOW,
        UA,
    );
    assert_eq!(b.value, TOKEN_B);
    // Our own User-Agent changes only the unsigned tail.
    let ours = oauth::msk_iam_token("us-east-1", &example_credentials(None), NOW, oauth::MSK_USER_AGENT);
    let url = String::from_utf8(base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&ours.value).unwrap()).unwrap();
    let reference =
        String::from_utf8(base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(TOKEN_A).unwrap()).unwrap();
    let (signed, tail) = url.split_once("&User-Agent=").unwrap();
    assert_eq!(signed, reference.split_once("&User-Agent=").unwrap().0);
    assert_eq!(tail, format!("pg_outbox%2F{}", env!("CARGO_PKG_VERSION")));
    // A leap day and a year end sign with the right dates.
    let leap = oauth::msk_iam_token("us-east-1", &example_credentials(None), 1_709_164_800 + 3_661, UA);
    let leap = String::from_utf8(base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(leap.value).unwrap()).unwrap();
    assert!(leap.contains("X-Amz-Date=20240229T010101Z"), "{leap}");
    let eoy = oauth::msk_iam_token("us-east-1", &example_credentials(None), 1_767_225_599, UA);
    let eoy = String::from_utf8(base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(eoy.value).unwrap()).unwrap();
    assert!(eoy.contains("X-Amz-Date=20251231T235959Z"), "{eoy}");
}

#[test]
fn the_msk_user_agent_names_the_extensions_version() {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml")).unwrap();
    let version = manifest.lines().find_map(|l| l.strip_prefix("version = \"")?.strip_suffix('"')).unwrap();
    assert_eq!(oauth::MSK_USER_AGENT, format!("pg_outbox/{version}"));
}
