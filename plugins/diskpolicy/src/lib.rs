//! diskpolicy: a mount low on space gets a cleanup plan, most harmless steps first.

use tuxpilot_guest::{json, Proposal, Reply, Request, Value};

struct Step {
    what: &'static str,
    command: &'static str,
    applies: fn(&str) -> bool,
    critical_only: bool,
}

const STEPS: &[Step] = &[
    Step { what: "package manager cache", command: "apt-get clean", applies: is_root_or_var, critical_only: false },
    Step { what: "journal beyond 200 MB", command: "journalctl --vacuum-size=200M", applies: is_root_or_var,
           critical_only: false },
    Step { what: "temporary files older than 7 days", command: "find /tmp -xdev -mtime +7 -delete",
           applies: is_root_or_tmp, critical_only: false },
    Step { what: "rotated logs", command: "find /var/log -name '*.gz' -delete", applies: is_root_or_var,
           critical_only: true },
    Step { what: "unused container images", command: "docker image prune -a", applies: is_root_or_var,
           critical_only: true },
];

fn is_root_or_var(mount: &str) -> bool {
    mount == "/" || mount.starts_with("/var")
}

fn is_root_or_tmp(mount: &str) -> bool {
    mount == "/" || mount.starts_with("/tmp")
}

fn plan(mount: &str, used_pct: f64, critical_pct: f64) -> Value {
    let critical = used_pct >= critical_pct;
    let steps: Vec<Value> = STEPS
        .iter()
        .filter(|s| (s.applies)(mount) && (critical || !s.critical_only))
        .map(|s| json!({"what": s.what, "command": s.command}))
        .collect();
    json!({
        "mount": mount,
        "used_pct": used_pct,
        "severity": if critical { "critical" } else { "warning" },
        "steps": steps,
    })
}

fn handle(request: Request) -> Reply {
    match request {
        Request::Action { action, params, config, .. } if action == "plan_cleanup" => {
            let mount = params["mount"].as_str().unwrap_or("/");
            let used = params["used_pct"].as_f64().unwrap_or(100.0);
            let critical = config["critical_pct"].as_f64().unwrap_or(95.0);
            Reply::ok(plan(mount, used, critical))
        }
        Request::Action { action, .. } => Reply::error("unknown_action", &format!("no action {}", action)),
        Request::Event { event, .. } => {
            let mount = event["resource"].as_str().unwrap_or("/");
            let used = event["value"].as_f64().unwrap_or(100.0);
            Reply::propose(vec![Proposal::new(
                "plan_cleanup",
                json!({"mount": mount, "used_pct": used}),
                &format!("{} is {:.0}% full", mount, used),
            )])
        }
    }
}

tuxpilot_guest::plugin!(handle);
