//! `shoal reports`: the device's queued status reports.

use crate::cmd::Ui;
use crate::cmd::install::ConfigArg;
use crate::reports::Queue;

/// Show the status reports waiting for delivery to the server, and those it refused.
///
/// Every install, boot-check, commit and rollback (standalone or by the daemon) is
/// recorded as a report signed by the device key; `shoal daemon` delivers them when
/// the server is reachable, with the time each happened.
///
/// Example: `shoal reports --json`
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the reports as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

/// Runs `shoal reports`.
pub fn run(args: Args, ui: &Ui) -> anyhow::Result<()> {
    let config = args.config.load()?;
    let queue = Queue::open(&config.device.data_dir)?;
    let pending = queue.peek(usize::MAX)?;
    let refused = queue.refused()?;
    drop(queue);
    let claimed = |s: &shoal_fleet::report::Signed| {
        s.claimed()
            .map(|r| serde_json::to_value(r).unwrap_or_default())
            .unwrap_or_else(|e| serde_json::json!({ "unreadable": e.to_string() }))
    };
    if args.json {
        let v = serde_json::json!({
            "pending": pending.iter().map(|(_, s)| claimed(s)).collect::<Vec<_>>(),
            "refused": refused.iter().map(|(_, r)| {
                let mut v = claimed(&r.signed);
                v["refused_because"] = r.reason.clone().into();
                v
            }).collect::<Vec<_>>(),
        });
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    ui.info(format!(
        "{} report(s) waiting for delivery, {} refused by the server",
        pending.len(),
        refused.len()
    ));
    for (seq, s) in &pending {
        match s.claimed() {
            Ok(r) => outln!(
                "{seq}\t{}\t{}\t{}\t{}",
                r.at_ms.map_or("-".into(), |t| t.to_string()),
                r.status,
                r.release
                    .map_or("-".into(), |r| format!("{}@{}", r.name, r.version)),
                r.substate.unwrap_or_default()
            ),
            Err(e) => outln!("{seq}\tunreadable: {e}"),
        }
    }
    for (seq, r) in &refused {
        outln!("{seq}\trefused: {}", r.reason);
    }
    Ok(())
}
