//! Print the messages of a Kafka topic, from the beginning:
//! `outbox-consume BOOTSTRAP TOPIC [MIN_MESSAGES] [TIMEOUT_SECONDS]`.
//! (kcat from Debian cannot talk to tansu; this uses the project's librdkafka.)

use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: outbox-consume BOOTSTRAP TOPIC [MIN_MESSAGES] [TIMEOUT_SECONDS]");
        std::process::exit(2);
    }
    let min: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    let timeout: u64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(30);
    let messages =
        pg_outbox_test::consume(&args[1], &args[2], min, Duration::from_secs(timeout), Duration::from_millis(1500));
    for m in &messages {
        let headers: Vec<String> = m.headers.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "partition={} offset={} key={} headers=[{}]\n{}\n",
            m.partition,
            m.offset,
            m.key.as_deref().unwrap_or("<null>"),
            headers.join(" "),
            m.payload
        );
    }
    println!("{} message(s) in topic {}", messages.len(), args[2]);
    if messages.len() < min {
        std::process::exit(1);
    }
}
