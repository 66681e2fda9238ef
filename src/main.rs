//! The `recap` binary: parse the command line, set up logging, dispatch to `recap::cmd`.

use clap::{CommandFactory, Parser};

fn main() -> std::process::ExitCode {
    let cli = match recap::cmd::Cli::try_parse() {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            let _ = e.print();
            return std::process::ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!(
                "error: {}",
                recap::config::one_line_clap_error(&e, &recap::cmd::Cli::command())
            );
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(recap::cmd::dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            // anyhow at the binary edge: one line, no secrets (errors never carry them).
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
