// `sqlx::migrate!` embeds the SQL files at compile time; without this the
// binary would keep serving an old schema after a migration is added.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
