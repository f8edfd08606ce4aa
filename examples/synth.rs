fn main() {
    let mut run = clt::demo::synthetic_config();
    let args: Vec<String> = std::env::args().collect();
    for a in &args[1..] {
        let (k, v) = a.split_once('=').unwrap();
        match k {
            "lambda" => run.train.lambda_sparsity = v.parse().unwrap(),
            "lr" => run.train.lr = v.parse().unwrap(),
            "steps" => run.train.steps = v.parse().unwrap(),
            "f" => run.model.n_features = v.parse().unwrap(),
            "rate" => run.train.init_fire_rate = Some(v.parse().unwrap()),
            "bw" => run.train.bandwidth = v.parse().unwrap(),
            "pre" => run.train.lambda_preact = v.parse().unwrap(),
            "ramp" => run.train.lambda_ramp_fraction = v.parse().unwrap(),
            "k" => {
                if let clt::train::DataConfig::Synthetic(s) = &mut run.data {
                    s.features_per_layer = v.parse().unwrap()
                }
            }
            "th" => run.train.theta_init = v.parse().unwrap(),
            "seed" => {
                run.train.seed = v.parse().unwrap();
                if let clt::train::DataConfig::Synthetic(s) = &mut run.data {
                    s.seed = v.parse().unwrap()
                }
            }
            "batch" => run.train.batch_size = v.parse().unwrap(),
            _ => panic!("{k}"),
        }
    }
    let dir = std::env::temp_dir().join(format!("synth-{}", std::process::id()));
    let r = clt::demo::run_synthetic(run, &dir, false).unwrap();
    println!(
        "nmse {:.4} {:?}\nl0 {:?}\nrecovered {:.3} in {:.1}s",
        r.nmse, r.nmse_per_layer, r.l0_per_layer, r.recovered_fraction, r.seconds
    );
    let mut rec = r.recovery.clone();
    rec.sort_by(|a, b| a.total_cmp(b));
    println!("worst {:?}", &rec[..8.min(rec.len())]);
}
