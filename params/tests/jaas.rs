//! Kafka's JAAS grammar, as Kafka's JaasConfig parses it.

use pg_outbox_params::jaas::{self, Flag};

const PLAIN: &str = "org.apache.kafka.common.security.plain.PlainLoginModule";

#[test]
fn jaas_strings_parse_as_kafka_parses_them() {
    let opts = |v: &[(&str, &str)]| v.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
    type Case = (&'static str, &'static str, Flag, Vec<(String, String)>);
    let ok: &[Case] = &[
        (
            r#"org.apache.kafka.common.security.plain.PlainLoginModule required username="alice" password="s3cr;et";"#,
            PLAIN,
            Flag::Required,
            opts(&[("username", "alice"), ("password", "s3cr;et")]),
        ),
        // Single quotes, Java escapes, octal, a quote of the other kind inside.
        (
            r#"m.Mod required username='bob' password="a\"b\\c\n\101'x";"#,
            "m.Mod",
            Flag::Required,
            opts(&[("username", "bob"), ("password", "a\"b\\c\nA'x")]),
        ),
        // Unquoted words may hold . - _ $ and digits after the first character.
        (
            "m.Mod REQUIRED user.name=alice-1_$x password=pw2;",
            "m.Mod",
            Flag::Required,
            opts(&[("user.name", "alice-1_$x"), ("password", "pw2")]),
        ),
        // Comments, line breaks, other flags; a repeated key keeps the last value.
        (
            "/* c */ m.Mod optional // line\n a=\"1\"\n b=\"x y\" a=\"2\" ;",
            "m.Mod",
            Flag::Optional,
            opts(&[("b", "x y"), ("a", "2")]),
        ),
        ("m.Mod sufficient;", "m.Mod", Flag::Sufficient, vec![]),
        ("m.Mod requisite ;  ", "m.Mod", Flag::Requisite, vec![]),
    ];
    for (text, module, flag, options) in ok {
        let j = jaas::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(&j.module, module, "{text}");
        assert_eq!(j.flag, *flag, "{text}");
        assert_eq!(&j.options, options, "{text}");
    }
}

#[test]
fn jaas_errors_say_what_is_wrong_and_never_show_a_value() {
    let bad: &[(&str, &str)] = &[
        (r#"m.Mod required username="u" password="hunter2""#, "not terminated by a semicolon"),
        (r#"m.Mod mandatory username="u";"#, "invalid login module control flag"),
        ("m.Mod", "control flag not specified"),
        (r#"m.Mod required password=123hunter2;"#, "starts with a digit"),
        (r#"m.Mod required password=hunter2:x;"#, "unexpected ':' where an option name belongs"),
        // An unquoted value with a space: the rest is not repeated as an option name.
        (r#"m.Mod required password=correct hunter2;"#, "value not specified for option (name not shown"),
        (r#"m.Mod required username="u" "hunter2";"#, "value not specified for option (name not shown"),
        (r#"m.Mod required password=;"#, "value not specified for option \"password\""),
        (r#"m.Mod required password "hunter2";"#, "value not specified for option \"password\""),
        (r#"m.Mod required password="hunter2;"#, "unterminated quoted string"),
        (r#"a.A required; b.B required;"#, "2 login modules"),
        ("  ", "no login module"),
        (r#""m.Mod" required;"#, "expected a login module class name"),
        ("m.Mod required /* x", "unterminated /* comment"),
    ];
    for (text, message) in bad {
        let e = jaas::parse(text).expect_err(text);
        assert!(e.contains(message), "{text}: {e}");
        assert!(!e.contains("hunter2"), "{text}: the error shows the secret: {e}");
    }
}
