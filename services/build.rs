// Migrations are embedded at compile time (`sqlx::migrate!` in
// `store::migrate`): rebuild when one is added or changed, which cargo
// would not notice by itself.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
