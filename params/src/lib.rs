//! pg_outbox's producer parameters, without Postgres: a destination's
//! parameters (Aidbox's names, after Java's producer configs) checked and
//! mapped onto librdkafka properties, Kafka's JAAS strings, and the
//! OAUTHBEARER tokens the worker makes. A plain library, so that its tests run
//! with `cargo test -p pg_outbox_params`, no Postgres needed.
//!
//! - `params`: the parameters, their one table of specs, the librdkafka
//!   configuration, redaction of secrets;
//! - `jaas`: Kafka's JAAS grammar (`saslJaasConfig`);
//! - `oauth`: OAUTHBEARER tokens: AWS MSK IAM (SigV4) and unsecured JWTs.

pub mod jaas;
pub mod oauth;
pub mod params;
