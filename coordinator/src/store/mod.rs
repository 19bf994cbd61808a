//! Storage: one SQLite file in the data directory through sqlx, in WAL mode with foreign keys
//! on. One file per table below; this module opens the database and migrates it.
//!
//! Migrations (in `coordinator/migrations`) run at start, each in its own transaction. Before
//! any migration runs on an existing database, the file is copied to `backups/` (a consistent
//! copy made by `VACUUM INTO`) and pending migrations are checked for data they would refuse,
//! so that one clear report names the offending rows and the old schema stays untouched.

pub mod audit;
pub mod keys;
pub mod networks;
pub mod nodes;
pub mod policies;
pub mod tokens;
pub mod workloads;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};

/// Every migration this build knows, embedded at compile time.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Name of the database file inside the data directory.
pub const DB_FILE: &str = "coordinator.db";

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed a query.
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// A migration failed; the schema is left as it was before that migration.
    #[error("migration failed, schema left at version {schema_version}: {source}")]
    Migrate {
        /// The schema version still in force.
        schema_version: i64,
        /// The cause.
        source: sqlx::migrate::MigrateError,
    },
    /// Stored rows would make a pending migration fail.
    #[error(
        "migration {version} ({description}) cannot run on this data; nothing was changed.\n\
         Offending rows:\n{rows}"
    )]
    BadData {
        /// The migration.
        version: i64,
        /// What it does.
        description: String,
        /// One line per offending row.
        rows: String,
    },
    /// Migrating an existing database failed after its backup was made.
    #[error("{source}\nThe database as it was before this start is backed up at {}", backup.display())]
    AfterBackup {
        /// Where the backup is.
        backup: PathBuf,
        /// The failure.
        source: Box<StoreError>,
    },
    /// The backup before migrating could not be made.
    #[error("backup of the database to {path} failed: {source}")]
    Backup {
        /// Where it was to go.
        path: String,
        /// The cause.
        source: sqlx::Error,
    },
    /// A stored value does not parse (the file was edited or damaged).
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
}

/// The result of opening the database.
#[derive(Debug)]
pub struct Opened {
    /// The pool.
    pub store: Store,
    /// Where the pre-migration backup went, when migrations ran on an existing database.
    pub backup: Option<PathBuf>,
    /// Migrations applied at this start.
    pub applied: Vec<i64>,
}

/// The database handle. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens (creating when missing) `dir/coordinator.db` and migrates it to the latest schema.
    pub async fn open(dir: &Path) -> Result<Opened, StoreError> {
        Self::open_with(dir, &MIGRATOR).await
    }

    /// Opens and migrates with a given migrator (tests use a prefix of [`MIGRATOR`] to build a
    /// database as an older version left it).
    pub async fn open_with(dir: &Path, migrator: &Migrator) -> Result<Opened, StoreError> {
        let path = dir.join(DB_FILE);
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        let store = Store { pool };

        let applied_before = store.applied_versions().await?;
        let pending: Vec<i64> = migrator
            .iter()
            .map(|m| m.version)
            .filter(|v| !applied_before.contains(v))
            .collect();
        let mut backup = None;
        if !pending.is_empty() && !applied_before.is_empty() {
            let schema_version = applied_before.iter().copied().max().unwrap_or(0);
            backup = Some(store.backup(dir, schema_version).await?);
        }
        if let Err(e) = store.migrate(migrator, &pending, backup.is_some()).await {
            store.close().await;
            return Err(match backup {
                Some(backup) => StoreError::AfterBackup {
                    backup,
                    source: Box::new(e),
                },
                None => e,
            });
        }
        Ok(Opened {
            store,
            backup,
            applied: pending,
        })
    }

    async fn migrate(
        &self,
        migrator: &Migrator,
        pending: &[i64],
        existing: bool,
    ) -> Result<(), StoreError> {
        if existing {
            for version in pending {
                self.preflight(*version).await?;
            }
        }
        if let Err(source) = migrator.run(&self.pool).await {
            let schema_version = self
                .applied_versions()
                .await?
                .into_iter()
                .max()
                .unwrap_or(0);
            return Err(StoreError::Migrate {
                schema_version,
                source,
            });
        }
        Ok(())
    }

    /// Starts a write transaction. `BEGIN IMMEDIATE` takes the write lock at once, so two
    /// concurrent writers queue on the busy timeout instead of failing half-way.
    pub async fn write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// The pool, for reads.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Closes the pool, checkpointing the WAL.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Versions recorded as applied; empty for a new database.
    pub async fn applied_versions(&self) -> Result<Vec<i64>, StoreError> {
        let exists: Option<(String,)> = sqlx::query_as(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        )
        .fetch_optional(&self.pool)
        .await?;
        if exists.is_none() {
            return Ok(Vec::new());
        }
        let rows: Vec<(i64,)> =
            sqlx::query_as("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().map(|(v,)| v).collect())
    }

    async fn backup(&self, dir: &Path, schema_version: i64) -> Result<PathBuf, StoreError> {
        let backups = dir.join("backups");
        std::fs::create_dir_all(&backups).map_err(|e| StoreError::Backup {
            path: backups.display().to_string(),
            source: sqlx::Error::Io(e),
        })?;
        let path = backups.join(format!(
            "{DB_FILE}.schema-v{schema_version}.{}",
            unix_now_ms()
        ));
        let target = path.display().to_string();
        sqlx::query("VACUUM INTO ?")
            .bind(&target)
            .execute(&self.pool)
            .await
            .map_err(|source| StoreError::Backup {
                path: target.clone(),
                source,
            })?;
        Ok(path)
    }

    /// Checks the data a pending migration would refuse, so that the report lists every
    /// offending row instead of the first constraint error.
    async fn preflight(&self, version: i64) -> Result<(), StoreError> {
        if version != 2 {
            return Ok(());
        }
        let clashes: Vec<(String, String)> = sqlx::query_as(
            "SELECT n.name, group_concat(x.name || ' (node id ' || x.id || ')', ', ')
             FROM nodes x JOIN networks n ON n.id = x.network_id
             WHERE x.state = 'active'
             GROUP BY x.network_id, lower(x.name) HAVING count(*) > 1
             ORDER BY n.name",
        )
        .fetch_all(&self.pool)
        .await?;
        if clashes.is_empty() {
            return Ok(());
        }
        let rows = clashes
            .iter()
            .map(|(net, names)| {
                format!("  network {net}: names equal ignoring case: {names}; delete or rename all but one")
            })
            .collect::<Vec<_>>()
            .join("\n");
        Err(StoreError::BadData {
            version,
            description: "node names unique ignoring case".into(),
            rows,
        })
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Converts a stored integer to u64, treating a negative value as damage.
pub(crate) fn to_u64(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} is negative ({v})")))
}

/// Converts a u64 to a stored integer.
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Decodes a JSON column.
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(
    s: &str,
    what: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// Encodes a JSON column.
pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> String {
    // Serializing plain data (strings, numbers, vectors, maps with string keys) cannot fail.
    serde_json::to_string(v).expect("plain data always serializes")
}

/// A network's row id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NetworkId(pub i64);

/// A node's row id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub i64);
