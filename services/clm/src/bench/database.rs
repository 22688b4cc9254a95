//! A throwaway PostgreSQL database for a benchmark run: created on the
//! server `--admin-database-url` points at, dropped afterwards.

use anyhow::Context as _;
use sqlx::{Connection as _, PgConnection};

/// A database created for one run.
pub struct TemporaryDatabase {
    admin: PgConnection,
    name: String,
    /// Its URL.
    pub url: String,
}

impl TemporaryDatabase {
    /// Creates `clm_bench_<prefix>_<random>` through `admin_url` (a URL that
    /// names a database to connect to for that).
    pub async fn create(admin_url: &str, prefix: &str) -> anyhow::Result<Self> {
        let name = format!(
            "clm_bench_{prefix}_{}",
            &uuid::Uuid::now_v7().simple().to_string()[20..]
        );
        let url = match admin_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => anyhow::bail!("--admin-database-url must name a database"),
        };
        let mut admin = PgConnection::connect(admin_url)
            .await
            .context("cannot reach PostgreSQL (--admin-database-url)")?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await?;
        Ok(Self { admin, name, url })
    }

    /// Drops the database (closing whatever is still connected to it).
    pub async fn drop(mut self) -> anyhow::Result<()> {
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        ))
        .execute(&mut self.admin)
        .await
        .context("cannot drop the benchmark database")?;
        Ok(())
    }
}
