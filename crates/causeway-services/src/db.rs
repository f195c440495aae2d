//! Opening a service's database through sqlx's `Any` driver, so one set of queries serves
//! SQLite (embedded, the default) and PostgreSQL.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Executor};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot create database directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open database {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("database {url}: {source}")]
    Query { url: String, source: sqlx::Error },
}

/// A connection pool plus the URL it was opened with (password removed), for messages.
#[derive(Clone)]
pub struct Database {
    pub pool: AnyPool,
    pub url: String,
}

impl Database {
    pub fn query_error(&self, source: sqlx::Error) -> DbError {
        DbError::Query {
            url: self.url.clone(),
            source,
        }
    }

    /// Runs schema and seed statements, each idempotent. Instances of a service start together;
    /// on PostgreSQL concurrent `CREATE TABLE IF NOT EXISTS` can still collide in the catalog,
    /// so the script runs under an advisory lock there (SQLite serialises writers itself).
    pub async fn run_script(&self, statements: &[&'static str]) -> Result<(), DbError> {
        let mut connection = self
            .pool
            .acquire()
            .await
            .map_err(|source| self.query_error(source))?;
        let postgres = self.url.starts_with("postgres");
        if postgres {
            connection
                .execute("SELECT pg_advisory_lock(7261655)")
                .await
                .map_err(|source| self.query_error(source))?;
        }
        let mut result = Ok(());
        for statement in statements {
            if let Err(source) = connection.execute(*statement).await {
                result = Err(self.query_error(source));
                break;
            }
        }
        if postgres {
            // Closing the connection would release the lock too; unlocking keeps it reusable.
            let _ = connection
                .execute("SELECT pg_advisory_unlock(7261655)")
                .await;
        }
        result
    }
}

/// Opens `database_url`, or a SQLite file at `default_sqlite` (created with its directory).
pub async fn connect(
    database_url: Option<&str>,
    default_sqlite: &Path,
) -> Result<Database, DbError> {
    install_default_drivers();
    let url = match database_url {
        Some(url) => url.to_string(),
        None => {
            if let Some(dir) = default_sqlite.parent() {
                std::fs::create_dir_all(dir).map_err(|source| DbError::CreateDir {
                    path: dir.to_path_buf(),
                    source,
                })?;
            }
            format!("sqlite://{}?mode=rwc", default_sqlite.display())
        }
    };
    let shown = redact(&url);
    let is_sqlite = url.starts_with("sqlite:");
    let pool = AnyPoolOptions::new()
        .max_connections(if is_sqlite { 4 } else { 8 })
        .acquire_timeout(Duration::from_secs(3))
        // A pooled SQLite connection is a file handle that cannot go stale; pinging it before
        // every query only cost each lookup a second round trip to its worker thread. A server
        // connection can die while idle, so PostgreSQL keeps the check.
        .test_before_acquire(!is_sqlite)
        .after_connect(move |connection, _| {
            Box::pin(async move {
                if is_sqlite {
                    // Several instances share one file: WAL lets readers run beside a writer,
                    // and the busy timeout waits out another instance's seed transaction.
                    connection.execute("PRAGMA busy_timeout = 5000").await?;
                    connection.execute("PRAGMA journal_mode = WAL").await?;
                }
                Ok(())
            })
        })
        .connect(&url)
        .await
        .map_err(|source| DbError::Connect {
            url: shown.clone(),
            source,
        })?;
    Ok(Database { pool, url: shown })
}

/// The URL without its password.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((credentials, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match credentials.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact("postgres://app:secret@127.0.0.1:5432/test"),
            "postgres://app:***@127.0.0.1:5432/test"
        );
        assert_eq!(
            redact("postgres://app@127.0.0.1/test"),
            "postgres://app@127.0.0.1/test"
        );
        assert_eq!(redact("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
    }
}
