//! How the demo shows what its devices are doing: on a terminal, one live line per
//! device (indicatif, on stderr); otherwise a plain line per change (stdout).

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cmd::Ui;

/// The devices' live state.
#[derive(Debug)]
pub struct Board {
    multi: Option<MultiProgress>,
    bars: Vec<ProgressBar>,
    names: Vec<String>,
    states: Vec<String>,
    quiet: bool,
}

impl Board {
    /// A board for the devices `names`.
    pub fn new(ui: &Ui, names: &[String]) -> Board {
        let multi = ui
            .shows_progress()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        let bars = match &multi {
            Some(m) => names
                .iter()
                .map(|n| {
                    let bar = m.add(ProgressBar::new_spinner());
                    bar.set_style(
                        ProgressStyle::with_template("    {spinner} {prefix:<6} {msg}")
                            .expect("static template"),
                    );
                    bar.set_prefix(n.clone());
                    bar.enable_steady_tick(std::time::Duration::from_millis(120));
                    bar
                })
                .collect(),
            None => Vec::new(),
        };
        Board {
            multi,
            bars,
            names: names.to_vec(),
            states: vec![String::new(); names.len()],
            quiet: ui.is_quiet(),
        }
    }

    /// Device `i` is now doing `state`: the live line changes, or a plain line says it.
    pub fn set(&mut self, i: usize, state: &str) {
        if self.states[i] == state {
            return;
        }
        self.states[i] = state.to_owned();
        match self.bars.get(i) {
            Some(bar) => bar.set_message(state.to_owned()),
            None if !self.quiet => outln!("    {}: {state}", self.names[i]),
            None => {}
        }
    }

    /// Device `i` reached `state`, which `line` tells: the live line changes and the
    /// line is printed above the live lines (plain: only the line).
    pub fn event(&mut self, i: usize, state: &str, line: &str) {
        self.states[i] = state.to_owned();
        if let Some(bar) = self.bars.get(i) {
            bar.set_message(state.to_owned());
        }
        self.say(line);
    }

    /// A line of the story while the board is shown (above the live lines).
    pub fn say(&self, text: &str) {
        match &self.multi {
            Some(m) => m.suspend(|| outln!("{text}")),
            None => outln!("{text}"),
        }
    }

    /// Removes the live lines.
    pub fn finish(self) {
        for bar in &self.bars {
            bar.finish_and_clear();
        }
        if let Some(m) = &self.multi {
            let _ = m.clear();
        }
    }
}
