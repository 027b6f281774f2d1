fn main() {
    let env = catena_cni::env::CniEnv::from_process();
    let code = catena_cni::run(
        env,
        &mut std::io::stdin().lock(),
        &mut std::io::stdout().lock(),
    );
    std::process::exit(code);
}
