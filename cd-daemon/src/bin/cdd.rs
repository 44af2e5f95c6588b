//! `cdd`: the cdsync daemon. One binary for every role; the config decides which.
//!
//! Exit codes: 0 clean stop, 64 bad configuration (the message names file, line and
//! reason), 1 any other failure (the error chain is printed).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cdd", version, about = "cdsync daemon")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon in the foreground with this configuration.
    Run {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate a configuration file (syntax, values, and the paths it names) and exit.
    CheckConfig { file: PathBuf },
}

const EXIT_CONFIG: u8 = 64;

fn load(
    file: &std::path::Path,
) -> Result<cd_daemon::config::Config, cd_daemon::config::ConfigError> {
    let mut cfg = cd_daemon::config::load(file)?;
    cfg.resolve()?;
    Ok(cfg)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::CheckConfig { file } => match load(&file) {
            Ok(cfg) => {
                println!("{}: ok (roles: {})", file.display(), cfg.roles().join(", "));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cdd: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Cmd::Run { config } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("cdd: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let filter = tracing_subscriber::EnvFilter::try_from_env("CDD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log_level));
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false)
                .init();
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cdd: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(cd_daemon::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cdd: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
