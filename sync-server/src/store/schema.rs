//! What both backends' numbered schema migrations share: a step, and (for tests) the check that
//! a backend's list of steps is exactly its folder of `migrations/`.

/// One numbered step: `migrations/<backend>/NNNN_name.sql`.
pub(crate) struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// The newest step of a list (0 for none).
pub(crate) fn newest(steps: &[Migration]) -> u32 {
    steps.last().map_or(0, |m| m.version)
}

/// Asserts that `steps` are the `.sql` files of `migrations/<folder>`, in order, numbered 1, 2, …
/// without gaps, each with its file's text.
#[cfg(test)]
pub(crate) fn assert_steps_are_the_folder(folder: &str, steps: &[Migration]) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations").join(folder);
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".sql"))
        .collect();
    files.sort();
    let names: Vec<String> = steps.iter().map(|m| format!("{:04}_{}.sql", m.version, m.name)).collect();
    assert_eq!(files, names);
    for (i, m) in steps.iter().enumerate() {
        assert_eq!(m.version as usize, i + 1, "steps are numbered 1, 2, … without gaps");
        assert_eq!(std::fs::read_to_string(dir.join(&names[i])).unwrap(), m.sql);
    }
}
