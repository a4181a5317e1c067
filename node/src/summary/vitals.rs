//! Vital signs as the summary records them, and NEWS2 ([`crate::news2`], a calculator that
//! knows nothing of the summary) read from and written into them.

use super::Vitals;
use crate::news2::{Assessment, Consciousness, Observations, WITHHELD_INCOMPLETE, score, withheld_text};

/// The observations of a vitals record in one line, with NEWS2 or why there is none:
/// `RR 24, SpO2 91% (scale 1, on oxygen), BP 98, pulse 118, ACVPU C, temp 38.6 °C; NEWS2 15`.
pub fn vitals_line(v: &Vitals) -> String {
    let or_dash = |x: Option<String>| x.unwrap_or_else(|| "—".into());
    let mut line = format!(
        "RR {}, SpO2 {} (scale {}, {}), BP {}, pulse {}, ACVPU {}, temp {}",
        or_dash(v.respiration_rate.map(|x| x.to_string())),
        or_dash(v.spo2.map(|x| format!("{x}%"))),
        v.spo2_scale,
        if v.on_oxygen { "on oxygen" } else { "air" },
        or_dash(v.systolic_bp.map(|x| x.to_string())),
        or_dash(v.pulse.map(|x| x.to_string())),
        or_dash(v.consciousness.clone()),
        or_dash(v.temperature_c.map(|x| format!("{x:.1} °C"))),
    );
    if v.pregnant == Some(true) {
        line.push_str(", pregnant");
    }
    let complete = score(&Observations::from_vitals(v)).is_ok();
    match (v.news2, v.news2_withheld.as_deref()) {
        (Some(total), None) if complete && v.pregnant != Some(true) => {
            line.push_str(&format!("; NEWS2 {total}"))
        }
        // A total from elsewhere (an import) that NEWS2 would not give for these observations.
        (Some(total), _) => line.push_str(&format!(
            "; NEWS2 {total} as recorded by the source, but {}: do not rely on it",
            if v.pregnant == Some(true) {
                "the patient is pregnant"
            } else {
                "the observations are incomplete"
            }
        )),
        (None, Some(code)) if code == WITHHELD_INCOMPLETE => {
            let missing = score(&Observations::from_vitals(v)).err().unwrap_or_default();
            line.push_str(&format!("; {} (missing: {})", withheld_text(code), missing.join(", ")));
        }
        (None, Some(code)) => line.push_str(&format!("; {}", withheld_text(code))),
        (None, None) => line.push_str("; no NEWS2"),
    }
    line
}

impl Observations {
    /// The observations recorded in a vitals record (an unreadable ACVPU letter counts as not
    /// observed).
    pub fn from_vitals(v: &Vitals) -> Self {
        Self {
            respiration_rate: v.respiration_rate,
            spo2: v.spo2,
            spo2_scale_2: v.spo2_scale == 2,
            on_oxygen: v.on_oxygen,
            systolic_bp: v.systolic_bp,
            pulse: v.pulse,
            consciousness: v.consciousness.as_deref().and_then(Consciousness::from_letter),
            temperature_c: v.temperature_c,
            pregnant: v.pregnant == Some(true),
        }
    }

    /// These observations as a vitals record, with what NEWS2 said of them.
    pub fn to_vitals(&self, assessment: &Assessment) -> Vitals {
        Vitals {
            respiration_rate: self.respiration_rate,
            spo2: self.spo2,
            spo2_scale: if self.spo2_scale_2 { 2 } else { 1 },
            on_oxygen: self.on_oxygen,
            systolic_bp: self.systolic_bp,
            pulse: self.pulse,
            consciousness: self.consciousness.map(|c| c.letter().to_string()),
            temperature_c: self.temperature_c,
            news2: assessment.news2().map(|n| n.total),
            pregnant: self.pregnant.then_some(true),
            news2_withheld: assessment.withheld().map(str::to_string),
        }
    }
}
