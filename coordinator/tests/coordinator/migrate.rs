//! Migrations (FC-29): a database left by an older schema with data the next migration
//! refuses. The start fails with one report naming the rows, the old schema stays as it was,
//! a backup is made first, and after the data is fixed the next start migrates.

use std::borrow::Cow;
use std::path::Path;
use std::time::{Duration, Instant};

use sqlx::migrate::Migrator;
use sqlx::sqlite::SqliteConnectOptions;
use ztnet_coordinator::store::{MIGRATOR, Store};

use crate::common::{start, try_start};

/// Builds `dir/coordinator.db` at schema version 1 with two active nodes whose names differ
/// only in case, which migration 2 (case-insensitive names) refuses.
async fn seed_v1(dir: &Path) {
    seed_v1_with(dir, &["db1", "DB1", "web1"]).await;
}

async fn seed_v1_with(dir: &Path, names: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    let v1 = Migrator {
        migrations: Cow::Owned(MIGRATOR.migrations[..1].to_vec()),
        ..Migrator::DEFAULT
    };
    let opened = Store::open_with(dir, &v1).await.unwrap();
    let pool = opened.store.pool();
    sqlx::query(
        "INSERT INTO networks (id, name, cidr, cidr6, zero_trust, created_at)
         VALUES (1, 'prod-vpc', '100.64.0.0/16', 'fd12:3456:789a:bcde::/64', 1, 0)",
    )
    .execute(pool)
    .await
    .unwrap();
    let keys: Vec<String> = (0..3)
        .map(|_| ztnet_proto::PrivateKey::generate().public_key().to_base64())
        .collect();
    for (i, name) in names.iter().enumerate() {
        let n = i + 1;
        sqlx::query(
            "INSERT INTO nodes (network_id, name, namespace, tags, spiffe_id, public_key,
                                addr_offset, ipv4, ipv6, created_at)
             VALUES (1, ?, 'production', '[]', ?, ?, ?, ?, ?, 0)",
        )
        .bind(name)
        .bind(format!("spiffe://corp.example/ns/production/node/{name}"))
        .bind(&keys[i])
        .bind(n as i64)
        .bind(format!("100.64.0.{n}"))
        .bind(format!("fd12:3456:789a:bcde::{n}"))
        .execute(pool)
        .await
        .unwrap();
    }
    opened.store.close().await;
}

async fn open_raw(dir: &Path) -> sqlx::SqlitePool {
    let opts = SqliteConnectOptions::new().filename(dir.join("coordinator.db"));
    sqlx::SqlitePool::connect_with(opts).await.unwrap()
}

async fn schema_version(pool: &sqlx::SqlitePool) -> i64 {
    let (v,): (i64,) = sqlx::query_as("SELECT MAX(version) FROM _sqlx_migrations")
        .fetch_one(pool)
        .await
        .unwrap();
    v
}

async fn has_name_key(pool: &sqlx::SqlitePool) -> bool {
    let cols: Vec<(String,)> = sqlx::query_as("SELECT name FROM pragma_table_info('nodes')")
        .fetch_all(pool)
        .await
        .unwrap();
    cols.iter().any(|(c,)| c == "name_key")
}

#[tokio::test]
async fn a_refused_migration_reports_the_rows_and_leaves_the_old_schema() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    seed_v1(dir).await;

    let started = Instant::now();
    let Err(log) = try_start(dir) else {
        panic!("started on data that migration 2 refuses");
    };
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(
        log.contains("db1 (node id 1)") && log.contains("DB1 (node id 2)"),
        "{log}"
    );
    assert!(log.contains("nothing was changed"), "{log}");
    assert!(
        log.contains("backups/coordinator.db.schema-v1."),
        "backup not named:\n{log}"
    );

    let pool = open_raw(dir).await;
    assert_eq!(schema_version(&pool).await, 1);
    assert!(
        !has_name_key(&pool).await,
        "migration 2 left a column behind"
    );
    let backups: Vec<_> = std::fs::read_dir(dir.join("backups")).unwrap().collect();
    assert_eq!(backups.len(), 1);

    // The operator renames one of the two; the next start migrates.
    sqlx::query("UPDATE nodes SET name = 'db1-old' WHERE name = 'DB1'")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let coord = start(dir);
    let pool = open_raw(dir).await;
    let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap();
    assert_eq!(schema_version(&pool).await, latest);
    assert!(has_name_key(&pool).await);
    pool.close().await;
    let nodes = coord
        .api()
        .ok("GET", "/v1/networks/prod-vpc/nodes", None)
        .await;
    assert_eq!(nodes.as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn a_failing_migration_rolls_back_every_step() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    seed_v1(dir).await;

    // Run the migrator directly, past the start-up check: the unique index of step 4 fails,
    // and the column that step 1 added must be gone with it.
    let pool = open_raw(dir).await;
    let err = MIGRATOR
        .run(&pool)
        .await
        .expect_err("duplicate names refuse migration 2");
    assert!(err.to_string().contains("2"), "{err}");
    assert_eq!(schema_version(&pool).await, 1);
    assert!(
        !has_name_key(&pool).await,
        "a failed migration left half its changes"
    );
    let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM nodes")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 3);
    pool.close().await;
}

#[tokio::test]
async fn a_migration_killed_half_way_leaves_the_old_schema_and_the_next_start_migrates() {
    use std::io::Write;
    use std::process::{Command, Stdio};

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    seed_v1_with(dir, &["db1", "web1"]).await;

    // Play migration 2 by hand up to its second step in another process, then SIGKILL it
    // before it commits: what a crash or an OOM kill half-way through does.
    let sql: String = MIGRATOR
        .iter()
        .find(|m| m.version == 2)
        .unwrap()
        .sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    let steps: Vec<&str> = sql
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    // sqlite3 block-buffers stdout on a pipe, so the marker goes through `.once FILE`, which
    // closes (and so flushes) the file after the one statement; the test polls for it.
    let marker = dir.join("step2.marker");
    let mut child = Command::new("sqlite3")
        .arg("-bail")
        .arg(dir.join("coordinator.db"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("sqlite3 runs");
    let mut stdin = child.stdin.take().unwrap();
    writeln!(
        stdin,
        ".timeout 10000\nBEGIN IMMEDIATE;\n{};\n{};\n.once {}\n\
         SELECT 'added=' || count(*) FROM pragma_table_info('nodes') WHERE name = 'name_key';",
        steps[0],
        steps[1],
        marker.display()
    )
    .unwrap();
    stdin.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let line = loop {
        let text = std::fs::read_to_string(&marker).unwrap_or_default();
        if text.contains("added=") {
            break text;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("sqlite3 exited ({status}) before it ran the first steps");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sqlite3 did not run the first steps within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        line.trim(),
        "added=1",
        "sqlite3 did not run the first steps"
    );
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .unwrap()
            .success()
    );
    child.wait().unwrap();
    drop(stdin);

    let pool = open_raw(dir).await;
    assert_eq!(schema_version(&pool).await, 1);
    assert!(
        !has_name_key(&pool).await,
        "the killed migration left a column"
    );
    pool.close().await;

    let coord = start(dir);
    let pool = open_raw(dir).await;
    let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap();
    assert_eq!(schema_version(&pool).await, latest);
    assert!(has_name_key(&pool).await);
    pool.close().await;
    let nodes = coord
        .api()
        .ok("GET", "/v1/networks/prod-vpc/nodes", None)
        .await;
    assert_eq!(nodes.as_array().unwrap().len(), 2);
    assert!(coord.log().contains("backed up"), "{}", coord.log());
}
