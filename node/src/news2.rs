//! NEWS2, the National Early Warning Score 2 (Royal College of Physicians, 2017).
//!
//! Seven parameters, each scored 0–3 by the RCP chart; the total ranges 0–20. A total of 5 or
//! more calls for an urgent response, 7 or more for an emergency response, and any single
//! parameter scoring 3 for an urgent ward-based review. SpO2 scale 2 is only for patients with
//! confirmed hypercapnic respiratory failure and a prescribed target of 88–92%.

use crate::summary::Vitals;

/// Level of consciousness on the ACVPU scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Enum))]
pub enum Consciousness {
    Alert,
    /// New confusion.
    Confusion,
    Voice,
    Pain,
    Unresponsive,
}

impl Consciousness {
    pub fn letter(self) -> &'static str {
        match self {
            Consciousness::Alert => "A",
            Consciousness::Confusion => "C",
            Consciousness::Voice => "V",
            Consciousness::Pain => "P",
            Consciousness::Unresponsive => "U",
        }
    }

    pub fn from_letter(s: &str) -> Option<Self> {
        match s.trim().to_ascii_uppercase().as_str() {
            "A" => Some(Consciousness::Alert),
            "C" => Some(Consciousness::Confusion),
            "V" => Some(Consciousness::Voice),
            "P" => Some(Consciousness::Pain),
            "U" => Some(Consciousness::Unresponsive),
            _ => None,
        }
    }
}

/// A complete set of observations, as NEWS2 needs them.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct Observations {
    pub respiration_rate: u32,
    pub spo2: u32,
    /// Use SpO2 scale 2 (hypercapnic respiratory failure, target 88–92%).
    pub spo2_scale_2: bool,
    pub on_oxygen: bool,
    pub systolic_bp: u32,
    pub pulse: u32,
    pub consciousness: Consciousness,
    pub temperature_c: f64,
}

/// The response NEWS2 calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Enum))]
pub enum ClinicalRisk {
    /// Total 0–4, no single parameter scoring 3.
    Low,
    /// A single parameter scored 3 (total under 5): urgent ward-based review.
    LowMediumSingleParameter,
    /// Total 5–6: urgent response.
    Medium,
    /// Total 7 or more: emergency response.
    High,
}

/// A NEWS2 score with its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct News2 {
    pub total: u32,
    pub respiration_rate: u32,
    pub spo2: u32,
    pub air_or_oxygen: u32,
    pub systolic_bp: u32,
    pub pulse: u32,
    pub consciousness: u32,
    pub temperature: u32,
    pub risk: ClinicalRisk,
}

impl News2 {
    /// Some parameter scored 3.
    pub fn single_parameter_3(&self) -> bool {
        [self.respiration_rate, self.spo2, self.systolic_bp, self.pulse, self.consciousness, self.temperature]
            .contains(&3)
    }
}

fn respiration(rr: u32) -> u32 {
    match rr {
        0..=8 => 3,
        9..=11 => 1,
        12..=20 => 0,
        21..=24 => 2,
        _ => 3,
    }
}

fn spo2_scale_1(s: u32) -> u32 {
    match s {
        0..=91 => 3,
        92..=93 => 2,
        94..=95 => 1,
        _ => 0,
    }
}

fn spo2_scale_2(s: u32, on_oxygen: bool) -> u32 {
    match (s, on_oxygen) {
        (0..=83, _) => 3,
        (84..=85, _) => 2,
        (86..=87, _) => 1,
        (88..=92, _) => 0,
        (_, false) => 0,
        (93..=94, true) => 1,
        (95..=96, true) => 2,
        (_, true) => 3,
    }
}

fn systolic(bp: u32) -> u32 {
    match bp {
        0..=90 => 3,
        91..=100 => 2,
        101..=110 => 1,
        111..=219 => 0,
        _ => 3,
    }
}

fn pulse(p: u32) -> u32 {
    match p {
        0..=40 => 3,
        41..=50 => 1,
        51..=90 => 0,
        91..=110 => 1,
        111..=130 => 2,
        _ => 3,
    }
}

fn temperature(t: f64) -> u32 {
    // The chart is in tenths of a degree: 35.0 scores 3, 35.1 scores 1.
    let tenths = (t * 10.0).round() as i64;
    match tenths {
        i64::MIN..=350 => 3,
        351..=360 => 1,
        361..=380 => 0,
        381..=390 => 1,
        _ => 2,
    }
}

/// Scores a complete set of observations.
pub fn score(o: &Observations) -> News2 {
    let mut n = News2 {
        total: 0,
        respiration_rate: respiration(o.respiration_rate),
        spo2: if o.spo2_scale_2 { spo2_scale_2(o.spo2, o.on_oxygen) } else { spo2_scale_1(o.spo2) },
        air_or_oxygen: if o.on_oxygen { 2 } else { 0 },
        systolic_bp: systolic(o.systolic_bp),
        pulse: pulse(o.pulse),
        consciousness: if o.consciousness == Consciousness::Alert { 0 } else { 3 },
        temperature: temperature(o.temperature_c),
        risk: ClinicalRisk::Low,
    };
    n.total = n.respiration_rate
        + n.spo2
        + n.air_or_oxygen
        + n.systolic_bp
        + n.pulse
        + n.consciousness
        + n.temperature;
    n.risk = match n.total {
        7.. => ClinicalRisk::High,
        5..=6 => ClinicalRisk::Medium,
        _ if n.single_parameter_3() => ClinicalRisk::LowMediumSingleParameter,
        _ => ClinicalRisk::Low,
    };
    n
}

impl Observations {
    /// The complete observations in a vitals record, or the names of what is missing.
    pub fn from_vitals(v: &Vitals) -> Result<Self, Vec<&'static str>> {
        let mut missing = Vec::new();
        let consciousness = v.consciousness.as_deref().and_then(Consciousness::from_letter);
        if v.respiration_rate.is_none() {
            missing.push("respiration rate");
        }
        if v.spo2.is_none() {
            missing.push("SpO2");
        }
        if v.systolic_bp.is_none() {
            missing.push("systolic blood pressure");
        }
        if v.pulse.is_none() {
            missing.push("pulse");
        }
        if consciousness.is_none() {
            missing.push("consciousness (ACVPU)");
        }
        if v.temperature_c.is_none() {
            missing.push("temperature");
        }
        if !missing.is_empty() {
            return Err(missing);
        }
        Ok(Self {
            respiration_rate: v.respiration_rate.expect("checked"),
            spo2: v.spo2.expect("checked"),
            spo2_scale_2: v.spo2_scale == 2,
            on_oxygen: v.on_oxygen,
            systolic_bp: v.systolic_bp.expect("checked"),
            pulse: v.pulse.expect("checked"),
            consciousness: consciousness.expect("checked"),
            temperature_c: v.temperature_c.expect("checked"),
        })
    }

    /// These observations as a vitals record, with their NEWS2 total.
    pub fn to_vitals(&self) -> Vitals {
        Vitals {
            respiration_rate: Some(self.respiration_rate),
            spo2: Some(self.spo2),
            spo2_scale: if self.spo2_scale_2 { 2 } else { 1 },
            on_oxygen: self.on_oxygen,
            systolic_bp: Some(self.systolic_bp),
            pulse: Some(self.pulse),
            consciousness: Some(self.consciousness.letter().to_string()),
            temperature_c: Some(self.temperature_c),
            news2: Some(score(self).total),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal() -> Observations {
        Observations {
            respiration_rate: 16,
            spo2: 97,
            spo2_scale_2: false,
            on_oxygen: false,
            systolic_bp: 120,
            pulse: 70,
            consciousness: Consciousness::Alert,
            temperature_c: 37.0,
        }
    }

    /// Scores `o` changed by `f`, and returns the total (every other parameter scores 0).
    fn total_with(f: impl Fn(&mut Observations)) -> u32 {
        let mut o = normal();
        f(&mut o);
        score(&o).total
    }

    #[test]
    fn normal_observations_score_zero() {
        let n = score(&normal());
        assert_eq!(n.total, 0);
        assert_eq!(n.risk, ClinicalRisk::Low);
    }

    #[test]
    fn respiration_rate_bands() {
        for (rr, expected) in
            [(8, 3), (9, 1), (11, 1), (12, 0), (20, 0), (21, 2), (24, 2), (25, 3), (0, 3), (60, 3)]
        {
            assert_eq!(total_with(|o| o.respiration_rate = rr), expected, "RR {rr}");
        }
    }

    #[test]
    fn spo2_scale_1_bands() {
        for (s, expected) in [(91, 3), (92, 2), (93, 2), (94, 1), (95, 1), (96, 0), (100, 0)] {
            assert_eq!(total_with(|o| o.spo2 = s), expected, "SpO2 {s}");
        }
    }

    #[test]
    fn spo2_scale_2_bands_on_air_and_oxygen() {
        // On air (the oxygen parameter scores 0).
        for (s, expected) in
            [(83, 3), (84, 2), (85, 2), (86, 1), (87, 1), (88, 0), (92, 0), (93, 0), (100, 0)]
        {
            assert_eq!(
                total_with(|o| {
                    o.spo2_scale_2 = true;
                    o.spo2 = s
                }),
                expected,
                "scale 2 on air {s}"
            );
        }
        // On oxygen: 2 for oxygen plus the SpO2 score.
        for (s, expected) in
            [(83, 3), (87, 1), (88, 0), (92, 0), (93, 1), (94, 1), (95, 2), (96, 2), (97, 3), (100, 3)]
        {
            let total = total_with(|o| {
                o.spo2_scale_2 = true;
                o.on_oxygen = true;
                o.spo2 = s
            });
            assert_eq!(total, expected + 2, "scale 2 on oxygen {s}");
        }
    }

    #[test]
    fn oxygen_scores_two_on_scale_1() {
        assert_eq!(total_with(|o| o.on_oxygen = true), 2);
    }

    #[test]
    fn systolic_bands() {
        for (bp, expected) in [(90, 3), (91, 2), (100, 2), (101, 1), (110, 1), (111, 0), (219, 0), (220, 3)] {
            assert_eq!(total_with(|o| o.systolic_bp = bp), expected, "BP {bp}");
        }
    }

    #[test]
    fn pulse_bands() {
        for (p, expected) in
            [(40, 3), (41, 1), (50, 1), (51, 0), (90, 0), (91, 1), (110, 1), (111, 2), (130, 2), (131, 3)]
        {
            assert_eq!(total_with(|o| o.pulse = p), expected, "pulse {p}");
        }
    }

    #[test]
    fn consciousness_bands() {
        assert_eq!(total_with(|o| o.consciousness = Consciousness::Alert), 0);
        for c in
            [Consciousness::Confusion, Consciousness::Voice, Consciousness::Pain, Consciousness::Unresponsive]
        {
            assert_eq!(total_with(|o| o.consciousness = c), 3, "{c:?}");
        }
    }

    #[test]
    fn temperature_bands() {
        for (t, expected) in [
            (35.0, 3),
            (35.1, 1),
            (36.0, 1),
            (36.1, 0),
            (38.0, 0),
            (38.1, 1),
            (39.0, 1),
            (39.1, 2),
            (42.0, 2),
            (30.0, 3),
        ] {
            assert_eq!(total_with(|o| o.temperature_c = t), expected, "T {t}");
        }
    }

    #[test]
    fn thresholds_and_the_single_parameter_rule() {
        // A single 3 with a total under 5.
        let n = score(&Observations { respiration_rate: 8, ..normal() });
        assert_eq!((n.total, n.risk), (3, ClinicalRisk::LowMediumSingleParameter));
        assert!(n.single_parameter_3());
        // 4 without a 3 is low.
        let n = score(&Observations { respiration_rate: 21, pulse: 111, ..normal() });
        assert_eq!((n.total, n.risk), (4, ClinicalRisk::Low));
        // 5 and 6 are medium.
        let n = score(&Observations { respiration_rate: 21, pulse: 111, temperature_c: 38.5, ..normal() });
        assert_eq!((n.total, n.risk), (5, ClinicalRisk::Medium));
        let n = score(&Observations { respiration_rate: 21, pulse: 111, temperature_c: 39.5, ..normal() });
        assert_eq!((n.total, n.risk), (6, ClinicalRisk::Medium));
        // 7 is high.
        let n = score(&Observations { respiration_rate: 25, pulse: 111, temperature_c: 39.5, ..normal() });
        assert_eq!((n.total, n.risk), (7, ClinicalRisk::High));
        // The maximum is 20.
        let worst = Observations {
            respiration_rate: 30,
            spo2: 80,
            spo2_scale_2: false,
            on_oxygen: true,
            systolic_bp: 80,
            pulse: 150,
            consciousness: Consciousness::Unresponsive,
            temperature_c: 34.0,
        };
        assert_eq!(score(&worst).total, 20);
    }

    #[test]
    fn incomplete_vitals_name_what_is_missing() {
        let mut v = normal().to_vitals();
        assert_eq!(v.news2, Some(0));
        v.pulse = None;
        v.consciousness = Some("X".into());
        let missing = Observations::from_vitals(&v).unwrap_err();
        assert_eq!(missing, vec!["pulse", "consciousness (ACVPU)"]);
    }
}
