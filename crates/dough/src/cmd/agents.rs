//! `dough agents`: the agent presets and whether each can run here.
use dough_core::agents::{self, Source};

use crate::Cli;

pub fn run(cli: &Cli) -> anyhow::Result<u8> {
    let host = super::host_config(cli, Default::default(), Default::default());
    let presets = agents::all(&host.state_dir)?;
    use super::table::{print, Align::Left};
    let mut rows = vec![];
    for (p, src) in &presets {
        let built = match dough_image::Image::load(&dough_image::Image::named(
            &host.state_dir,
            &p.image.name,
        )) {
            Ok(img) => img.manifest.digest[..12.min(img.manifest.digest.len())].to_string(),
            Err(_) => "no".to_string(),
        };
        let secrets: Vec<String> = p
            .task
            .secret_env
            .iter()
            .map(|s| {
                if std::env::var_os(s).is_some() {
                    format!("{s} (set)")
                } else {
                    format!("{s} (unset)")
                }
            })
            .collect();
        rows.push(vec![
            p.name.clone(),
            p.image.name.clone(),
            built,
            secrets.join(","),
            p.provider
                .as_ref()
                .map_or("-".to_string(), |pr| pr.base_url.clone()),
            match src {
                Source::BuiltIn => "built-in".to_string(),
                Source::File(f) => f.display().to_string(),
            },
        ]);
    }
    print(
        &[
            ("AGENT", Left),
            ("IMAGE", Left),
            ("BUILT", Left),
            ("SECRETS", Left),
            ("MODEL API", Left),
            ("SOURCE", Left),
        ],
        &rows,
    );
    println!(
        "\nbuild an image: dough image build --agent NAME · run: dough run --agent NAME --repo URL --prompt TEXT\nyour own presets: {}/NAME.toml (docs/agents.md)",
        agents::user_dir(&host.state_dir).display()
    );
    Ok(0)
}
