//! NEWS2, the National Early Warning Score 2 (Royal College of Physicians, 2017).
//!
//! Over 600 lines with its tests (about 240: every band of the chart is checked).
//!
//! Seven parameters, each scored 0–3 by the RCP chart; the total ranges 0–20. A total of 5 or
//! more calls for an urgent response, 7 or more for an emergency response, and any single
//! parameter scoring 3 for an urgent ward-based review. SpO2 scale 2 is only for patients with
//! confirmed hypercapnic respiratory failure and a prescribed target of 88–92%.
//!
//! NEWS2 is validated for adults (16 and over) who are not pregnant: [`assess`] does not score a
//! child (the trust's paediatric early warning score applies) or a pregnant patient (the maternity
//! early warning score applies), and never scores a partial set as if complete — it names what is
//! missing. The observations are recorded in every case.

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

/// The observations a crew took: any of them may be missing (a crew may not get a temperature).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct Observations {
    pub respiration_rate: Option<u32>,
    pub spo2: Option<u32>,
    /// Use SpO2 scale 2 (hypercapnic respiratory failure, target 88–92%).
    pub spo2_scale_2: bool,
    pub on_oxygen: bool,
    pub systolic_bp: Option<u32>,
    pub pulse: Option<u32>,
    pub consciousness: Option<Consciousness>,
    pub temperature_c: Option<f64>,
    /// The patient is pregnant (NEWS2 does not apply).
    pub pregnant: bool,
}

/// The youngest age NEWS2 is validated for.
pub const ADULT_AGE: u32 = 16;

/// What NEWS2 says about a set of observations: a score, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Enum))]
pub enum Assessment {
    /// Scored. `age_known` is false when the record has no readable date of birth: NEWS2 then
    /// assumes an adult, and says so.
    Scored { news2: News2, age_known: bool },
    /// Under 16: NEWS2 is not validated for children; use the trust's paediatric early warning
    /// score (PEWS).
    NotForChildren { age_years: u32 },
    /// Pregnant: NEWS2 is not validated in pregnancy; use the maternity early warning score.
    NotInPregnancy,
    /// Not every parameter was observed: these are missing, and no partial total is given.
    Incomplete { missing: Vec<String> },
}

impl Assessment {
    /// The score, when there is one.
    pub fn news2(&self) -> Option<&News2> {
        match self {
            Assessment::Scored { news2, .. } => Some(news2),
            _ => None,
        }
    }

    /// Why there is no score, as stored with the vitals (`under-16`, `pregnancy`, `incomplete`).
    pub fn withheld(&self) -> Option<&'static str> {
        match self {
            Assessment::Scored { .. } => None,
            Assessment::NotForChildren { .. } => Some(WITHHELD_UNDER_16),
            Assessment::NotInPregnancy => Some(WITHHELD_PREGNANCY),
            Assessment::Incomplete { .. } => Some(WITHHELD_INCOMPLETE),
        }
    }
}

pub const WITHHELD_UNDER_16: &str = "under-16";
pub const WITHHELD_PREGNANCY: &str = "pregnancy";
pub const WITHHELD_INCOMPLETE: &str = "incomplete";

/// What a stored reason for no score means, for a clinician.
pub fn withheld_text(code: &str) -> &'static str {
    match code {
        WITHHELD_UNDER_16 => {
            "NEWS2 does not apply under 16: use the trust's paediatric early warning score (PEWS)"
        }
        WITHHELD_PREGNANCY => "NEWS2 does not apply in pregnancy: use the maternity early warning score",
        WITHHELD_INCOMPLETE => "NEWS2 not scored: observations incomplete",
        _ => "NEWS2 not scored",
    }
}

/// Assesses observations for a patient of `age_years` (`None` when the date of birth is not
/// known or not readable: NEWS2 is then scored as for an adult, marked `age_known: false`).
pub fn assess(o: &Observations, age_years: Option<u32>) -> Assessment {
    if let Some(age) = age_years.filter(|a| *a < ADULT_AGE) {
        return Assessment::NotForChildren { age_years: age };
    }
    if o.pregnant {
        return Assessment::NotInPregnancy;
    }
    match score(o) {
        Ok(news2) => Assessment::Scored { news2, age_known: age_years.is_some() },
        Err(missing) => Assessment::Incomplete { missing: missing.into_iter().map(str::to_string).collect() },
    }
}

/// Age in whole years on `at_ms` (UTC), from an ISO date of birth (`YYYY-MM-DD`, or `YYYY-MM`,
/// `YYYY`: then the youngest the patient can be). A date of birth after `at_ms` gives 0 (so a
/// newborn, or a wrong date, is never taken for an adult); an unreadable one gives `None`.
pub fn age_years(date_of_birth: &str, at_ms: i64) -> Option<u32> {
    let text = date_of_birth.trim();
    let mut parts = text.get(..10.min(text.len()))?.split('-');
    let year: i32 = parts.next().filter(|y| y.len() == 4)?.parse().ok().filter(|y| *y >= 1)?;
    let month = time::Month::try_from(parts.next().map_or(Ok(12), str::parse::<u8>).ok()?).ok()?;
    let born = match parts.next() {
        Some(day) => time::Date::from_calendar_date(year, month, day.parse().ok()?).ok()?,
        None => time::Date::from_calendar_date(year, month, month.length(year)).ok()?,
    };
    let today = time::OffsetDateTime::from_unix_timestamp(at_ms / 1000).ok()?.date();
    let mut age = today.year() - born.year();
    if (today.month() as u8, today.day()) < (born.month() as u8, born.day()) {
        age -= 1;
    }
    Some(u32::try_from(age).unwrap_or(0))
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

/// Scores a complete set of observations, or names what is missing.
pub fn score(o: &Observations) -> Result<News2, Vec<&'static str>> {
    let mut missing = Vec::new();
    let mut need = |v: Option<u32>, name| {
        if v.is_none() {
            missing.push(name);
        }
        v.unwrap_or_default()
    };
    let rr = need(o.respiration_rate, "respiration rate");
    let spo2 = need(o.spo2, "SpO2");
    let bp = need(o.systolic_bp, "systolic blood pressure");
    let p = need(o.pulse, "pulse");
    if o.consciousness.is_none() {
        missing.push("consciousness (ACVPU)");
    }
    if o.temperature_c.is_none() {
        missing.push("temperature");
    }
    let (Some(consciousness), Some(t), true) = (o.consciousness, o.temperature_c, missing.is_empty()) else {
        return Err(missing);
    };
    let mut n = News2 {
        total: 0,
        respiration_rate: respiration(rr),
        spo2: if o.spo2_scale_2 { spo2_scale_2(spo2, o.on_oxygen) } else { spo2_scale_1(spo2) },
        air_or_oxygen: if o.on_oxygen { 2 } else { 0 },
        systolic_bp: systolic(bp),
        pulse: pulse(p),
        consciousness: if consciousness == Consciousness::Alert { 0 } else { 3 },
        temperature: temperature(t),
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
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal() -> Observations {
        Observations {
            respiration_rate: Some(16),
            spo2: Some(97),
            spo2_scale_2: false,
            on_oxygen: false,
            systolic_bp: Some(120),
            pulse: Some(70),
            consciousness: Some(Consciousness::Alert),
            temperature_c: Some(37.0),
            pregnant: false,
        }
    }

    /// Scores `o` changed by `f`, and returns the total (every other parameter scores 0).
    fn total_with(f: impl Fn(&mut Observations)) -> u32 {
        let mut o = normal();
        f(&mut o);
        score(&o).unwrap().total
    }

    #[test]
    fn normal_observations_score_zero() {
        let n = score(&normal()).unwrap();
        assert_eq!(n.total, 0);
        assert_eq!(n.risk, ClinicalRisk::Low);
    }

    #[test]
    fn respiration_rate_bands() {
        for (rr, expected) in
            [(8, 3), (9, 1), (11, 1), (12, 0), (20, 0), (21, 2), (24, 2), (25, 3), (0, 3), (60, 3)]
        {
            assert_eq!(total_with(|o| o.respiration_rate = Some(rr)), expected, "RR {rr}");
        }
    }

    #[test]
    fn spo2_scale_1_bands() {
        for (s, expected) in [(91, 3), (92, 2), (93, 2), (94, 1), (95, 1), (96, 0), (100, 0)] {
            assert_eq!(total_with(|o| o.spo2 = Some(s)), expected, "SpO2 {s}");
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
                    o.spo2 = Some(s)
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
                o.spo2 = Some(s)
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
            assert_eq!(total_with(|o| o.systolic_bp = Some(bp)), expected, "BP {bp}");
        }
    }

    #[test]
    fn pulse_bands() {
        for (p, expected) in
            [(40, 3), (41, 1), (50, 1), (51, 0), (90, 0), (91, 1), (110, 1), (111, 2), (130, 2), (131, 3)]
        {
            assert_eq!(total_with(|o| o.pulse = Some(p)), expected, "pulse {p}");
        }
    }

    #[test]
    fn consciousness_bands() {
        assert_eq!(total_with(|o| o.consciousness = Some(Consciousness::Alert)), 0);
        for c in
            [Consciousness::Confusion, Consciousness::Voice, Consciousness::Pain, Consciousness::Unresponsive]
        {
            assert_eq!(total_with(|o| o.consciousness = Some(c)), 3, "{c:?}");
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
            assert_eq!(total_with(|o| o.temperature_c = Some(t)), expected, "T {t}");
        }
    }

    #[test]
    fn thresholds_and_the_single_parameter_rule() {
        // A single 3 with a total under 5.
        let n = score(&Observations { respiration_rate: Some(8), ..normal() }).unwrap();
        assert_eq!((n.total, n.risk), (3, ClinicalRisk::LowMediumSingleParameter));
        assert!(n.single_parameter_3());
        // 4 without a 3 is low.
        let n = score(&Observations { respiration_rate: Some(21), pulse: Some(111), ..normal() }).unwrap();
        assert_eq!((n.total, n.risk), (4, ClinicalRisk::Low));
        // 5 and 6 are medium.
        let n = score(&Observations {
            respiration_rate: Some(21),
            pulse: Some(111),
            temperature_c: Some(38.5),
            ..normal()
        })
        .unwrap();
        assert_eq!((n.total, n.risk), (5, ClinicalRisk::Medium));
        let n = score(&Observations {
            respiration_rate: Some(21),
            pulse: Some(111),
            temperature_c: Some(39.5),
            ..normal()
        })
        .unwrap();
        assert_eq!((n.total, n.risk), (6, ClinicalRisk::Medium));
        // 7 is high.
        let n = score(&Observations {
            respiration_rate: Some(25),
            pulse: Some(111),
            temperature_c: Some(39.5),
            ..normal()
        })
        .unwrap();
        assert_eq!((n.total, n.risk), (7, ClinicalRisk::High));
        // The maximum is 20.
        let worst = Observations {
            respiration_rate: Some(30),
            spo2: Some(80),
            spo2_scale_2: false,
            on_oxygen: true,
            systolic_bp: Some(80),
            pulse: Some(150),
            consciousness: Some(Consciousness::Unresponsive),
            temperature_c: Some(34.0),
            pregnant: false,
        };
        assert_eq!(score(&worst).unwrap().total, 20);
    }

    #[test]
    fn partial_observations_are_not_scored_and_say_what_is_missing() {
        let partial = Observations { pulse: None, temperature_c: None, ..normal() };
        assert_eq!(
            assess(&partial, Some(40)),
            Assessment::Incomplete { missing: vec!["pulse".into(), "temperature".into()] }
        );
        let v = partial.to_vitals(&assess(&partial, Some(40)));
        assert_eq!((v.news2, v.news2_withheld.as_deref(), v.pulse), (None, Some("incomplete"), None));
        assert_eq!(Observations::from_vitals(&v), partial, "recorded as taken");
    }

    #[test]
    fn children_and_pregnancy_are_not_scored_and_adults_are() {
        let sick = Observations { respiration_rate: Some(30), pulse: Some(150), ..normal() };
        assert_eq!(assess(&sick, Some(4)), Assessment::NotForChildren { age_years: 4 });
        assert_eq!(assess(&sick, Some(15)), Assessment::NotForChildren { age_years: 15 });
        assert!(
            matches!(assess(&sick, Some(16)), Assessment::Scored { news2, age_known: true } if news2.total == 6)
        );
        assert!(
            matches!(assess(&sick, None), Assessment::Scored { age_known: false, .. }),
            "age unknown: scored, marked"
        );
        let pregnant = Observations { pregnant: true, ..sick };
        assert_eq!(assess(&pregnant, Some(30)), Assessment::NotInPregnancy);
        let v = pregnant.to_vitals(&Assessment::NotInPregnancy);
        assert_eq!((v.news2, v.news2_withheld.as_deref(), v.pregnant), (None, Some("pregnancy"), Some(true)));
    }

    #[test]
    fn ages_count_whole_years_to_the_birthday() {
        let at = |y: i32, m: u8, d: u8| {
            time::Date::from_calendar_date(y, time::Month::try_from(m).unwrap(), d)
                .unwrap()
                .midnight()
                .assume_utc()
                .unix_timestamp()
                * 1000
        };
        assert_eq!(age_years("2010-06-15", at(2026, 6, 14)), Some(15));
        assert_eq!(age_years("2010-06-15", at(2026, 6, 15)), Some(16));
        assert_eq!(age_years("2022-03-01", at(2026, 12, 1)), Some(4));
        assert_eq!(age_years("2008-02-29", at(2024, 2, 28)), Some(15));
        assert_eq!(
            age_years("2008-02-29", at(2025, 2, 28)),
            Some(16),
            "a non-leap year: 1 March is the birthday"
        );
        assert_eq!(age_years("2008-02-29", at(2025, 3, 1)), Some(17));
        assert_eq!(age_years("2010", at(2026, 12, 30)), Some(15), "a year only: the youngest possible");
        assert_eq!(age_years("2026", at(2026, 6, 1)), Some(0), "born this year, month unknown: a baby");
        assert_eq!(age_years("2026-06", at(2026, 6, 1)), Some(0));
        assert_eq!(
            age_years("2027-01-01", at(2026, 6, 1)),
            Some(0),
            "a date in the future is never an adult"
        );
        for unreadable in ["not a date", "15/06/2010", "2010-06-00", "2010-02-30", "0000-01-01", "10-06-15"] {
            assert_eq!(age_years(unreadable, at(2026, 1, 1)), None, "{unreadable}");
        }
    }
}
