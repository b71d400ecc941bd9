//! `refresh`: one token now, every due token once (`--due`), or until stopped
//! (`--watch`).

use std::time::{Duration, Instant};

use tokenguard::error::exit;
use tokenguard::guard::refresh::RefreshOutcome;
use tokenguard::{Error, Result};

use super::{Ctx, print_json};
use crate::cli::RefreshArgs;
use crate::input;

/// How a report is printed in JSON: one object, an array, or JSON lines (a stream).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    One,
    List,
    Stream,
}

/// Prints each outcome; the exit code is that of the most serious one.
fn report(ctx: &Ctx, outcomes: &[RefreshOutcome], shape: Shape) -> Result<i32> {
    if ctx.json && shape != Shape::Stream {
        let v = match (shape, outcomes) {
            (Shape::One, [o]) => serde_json::to_value(o),
            _ => serde_json::to_value(outcomes),
        };
        print_json(&v.unwrap_or_default())?;
    }
    let mut code = exit::OK;
    for o in outcomes {
        if ctx.json {
            if shape == Shape::Stream {
                print_json(&serde_json::to_value(o).unwrap_or_default())?;
            }
        } else {
            let detail = if o.detail.is_empty() { String::new() } else { format!(" ({})", o.detail) };
            say!("{}/{}: {}{detail}", o.provider, o.name, o.outcome)?;
        }
        code = match (o.outcome.exit_code(), code) {
            (exit::OTHER, _) => exit::OTHER,
            (c, exit::OK) => c,
            (_, c) => c,
        };
    }
    Ok(code)
}

pub fn refresh(ctx: &Ctx, a: RefreshArgs) -> Result<i32> {
    let one = match (&a.provider, a.due, a.watch) {
        (Some(p), false, false) => Some(crate::input::token_ref(p, a.name.as_deref())?),
        _ => None,
    };
    // One token through the agent, which holds the store (its scheduler does what
    // --due and --watch do).
    if let Some((p, n)) = &one
        && let Some(mut agent) = ctx.agent()?
    {
        let o: RefreshOutcome = agent.call(tokenguard::agent::protocol::Request::token("refresh", p, n))?;
        return report(ctx, &[o], Shape::One);
    }
    let g = ctx.open()?;
    let within = a.within.as_deref().map(input::duration).transpose()?.map(Duration::from_secs);
    match (&one, &a.provider, a.due, a.watch) {
        (Some((p, n)), ..) => {
            let (_, o) = g.refresh_now(p, n)?;
            report(ctx, &[o], Shape::One)
        }
        (None, None, true, false) => report(ctx, &g.refresh_due(within)?, Shape::List),
        (None, None, false, true) => {
            let interval = Duration::from_secs(input::duration(&a.interval)?.max(1));
            tokenguard::signals::stop_between_passes();
            tracing::info!(interval_s = interval.as_secs(), "refresh --watch started");
            let mut code = exit::OK;
            while !tokenguard::signals::stop_requested() {
                // A pass refreshes token by token; a signal is only looked at between
                // tokens, so it never interrupts a refresh between answer and commit.
                code = code.max(report(ctx, &g.refresh_due(within)?, Shape::Stream)?);
                let until = Instant::now() + interval;
                while !tokenguard::signals::stop_requested() && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            tracing::info!("refresh --watch stopped");
            Ok(code)
        }
        _ => Err(Error::InvalidInput("refresh takes PROVIDER NAME, or --due, or --watch".into())),
    }
}
