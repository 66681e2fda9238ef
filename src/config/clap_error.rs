//! clap's errors as one line that names the environment variable.

use super::secret::scrub;

/// Finds an argument by its long name (or value name) in `cmd` and all its subcommands.
fn find_arg<'a>(
    cmd: &'a clap::Command,
    long: Option<&str>,
    value_name: Option<&str>,
) -> Option<&'a clap::Arg> {
    let hit = cmd.get_arguments().find(|a| {
        long.is_some_and(|l| a.get_long() == Some(l))
            || (long.is_none()
                && value_name.is_some_and(|v| {
                    a.get_value_names()
                        .is_some_and(|names| names.iter().any(|n| n.as_str() == v))
                        || a.get_id().as_str().eq_ignore_ascii_case(v)
                }))
    });
    hit.or_else(|| {
        cmd.get_subcommands()
            .find_map(|sub| find_arg(sub, long, value_name))
    })
}

/// Turns a clap error into one line. For a bad value (from a flag or an environment variable)
/// it names the environment variable:
/// `invalid value "abc" for IDLE_GAP_MINUTES (--idle-gap-minutes): invalid digit found in string`.
/// Other kinds give the first line of clap's message without its `error: ` prefix. (Handle
/// `DisplayHelp`/`DisplayVersion` with `err.exit()` before calling this.) Values of arguments
/// whose environment values are hidden (secrets) are shown as `***`.
pub fn one_line_clap_error(err: &clap::Error, cmd: &clap::Command) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};

    let first_line = || {
        let text = err.to_string();
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("")
            .to_owned();
        line.strip_prefix("error: ")
            .map(str::to_owned)
            .unwrap_or(line)
    };
    if !matches!(
        err.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return first_line();
    }
    let ctx_str = |k: ContextKind| match err.get(k) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        Some(ContextValue::StyledStr(s)) => Some(s.to_string()),
        _ => None,
    };
    let Some(rendered) = ctx_str(ContextKind::InvalidArg) else {
        return first_line();
    };
    let value = ctx_str(ContextKind::InvalidValue).unwrap_or_default();
    // "--idle-gap-minutes <IDLE_GAP_MINUTES>" / "--flag" / "<NAME>"
    let long = rendered
        .strip_prefix("--")
        .map(|r| r.split([' ', '=']).next().unwrap_or(r).to_owned());
    let value_name = rendered
        .split_once('<')
        .and_then(|(_, r)| r.split_once('>'))
        .map(|(v, _)| v.to_owned());
    let arg = find_arg(cmd, long.as_deref(), value_name.as_deref());

    let env = arg
        .and_then(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned());
    let hidden = arg.is_some_and(|a| a.is_hide_env_values_set());
    let value = if hidden { "***".to_owned() } else { value };
    let flag = long
        .map(|l| format!("--{l}"))
        .unwrap_or_else(|| rendered.clone());
    let target = match env {
        Some(env) => format!("{env} ({flag})"),
        None => flag,
    };
    let reason = match err.kind() {
        ErrorKind::InvalidValue => match err.get(ContextKind::ValidValue) {
            Some(ContextValue::Strings(v)) if !v.is_empty() => {
                format!("expected one of {}", v.join(", "))
            }
            _ if value.is_empty() => "a value is required".to_owned(),
            _ => "not an accepted value".to_owned(),
        },
        _ => std::error::Error::source(err)
            .map(|e| e.to_string())
            .unwrap_or_else(|| "invalid value".to_owned()),
    };
    let reason = reason.lines().next().unwrap_or("").trim().to_owned();
    let reason = if hidden {
        scrub(reason, &[&value])
    } else {
        reason
    };
    format!("invalid value {value:?} for {target}: {reason}")
}
