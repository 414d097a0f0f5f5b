#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use internal_api::cli::{self, Cli, Command};
use internal_api::configuration::Settings;
use internal_api::telemetry::{self, LogTarget};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);

    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("internal-api: {err}");
            return ExitCode::from(2);
        }
    };

    let target = if command == Command::ExportSnapshot {
        LogTarget::Stderr
    } else {
        LogTarget::Stdout
    };
    telemetry::init(&settings.log_filter, target);

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("internal-api: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(command, settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "internal-api failed");
            ExitCode::FAILURE
        }
    }
}
