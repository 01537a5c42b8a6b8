//! Where MSK IAM finds its region and credentials. Alone in its test binary:
//! it changes the process's environment.

use pg_outbox_params::oauth;

#[test]
fn msk_iam_region_and_credentials_come_from_the_standard_places() {
    assert_eq!(
        oauth::region_of_host("b-1.demo.abc123.c2.kafka.eu-central-1.amazonaws.com").as_deref(),
        Some("eu-central-1")
    );
    assert_eq!(
        oauth::region_of_host("boot-x.c1.kafka-serverless.us-west-2.amazonaws.com").as_deref(),
        Some("us-west-2")
    );
    assert_eq!(oauth::region_of_host("b-2.x.kafka.cn-north-1.amazonaws.com.cn").as_deref(), Some("cn-north-1"));
    assert_eq!(oauth::region_of_host("localhost"), None);
    let dir = std::env::temp_dir().join(format!("pg_outbox_aws_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("credentials");
    std::fs::write(
        &file,
        "[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = s1\n\n# comment\n[prod]\naws_access_key_id=AKIDPROD\naws_secret_access_key = s2\naws_session_token = t2\n",
    )
    .unwrap();
    // Safety: this test is alone in its binary; nothing else reads the environment meanwhile.
    unsafe {
        std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", &file);
        std::env::set_var("AWS_CONFIG_FILE", dir.join("none"));
        std::env::remove_var("AWS_ACCESS_KEY_ID");
        std::env::remove_var("AWS_PROFILE");
    }
    assert_eq!(oauth::aws_credentials(None).unwrap().access_key_id, "AKIDDEFAULT");
    let prod = oauth::aws_credentials(Some("prod")).unwrap();
    assert_eq!((prod.access_key_id.as_str(), prod.session_token.as_deref()), ("AKIDPROD", Some("t2")));
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "AKIDENV");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "s3");
    }
    assert_eq!(oauth::aws_credentials(None).unwrap().access_key_id, "AKIDENV");
    // A profile named in the JAAS options wins over the environment.
    assert_eq!(oauth::aws_credentials(Some("prod")).unwrap().access_key_id, "AKIDPROD");
    let missing = oauth::aws_credentials(Some("nope")).unwrap_err();
    assert!(missing.contains("profile \"nope\"") && !missing.contains("s2"), "{missing}");
    unsafe {
        std::env::remove_var("AWS_ACCESS_KEY_ID");
        std::env::remove_var("AWS_SECRET_ACCESS_KEY");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
