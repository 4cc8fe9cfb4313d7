//! Invocation traces for `ember simulate` beyond the single-function shapes: a generated fleet of
//! functions shaped after the Azure Functions 2019 trace ("Serverless in the Wild", USENIX ATC'20),
//! and that trace's own format (per-minute invocation counts per function, duration percentiles)
//! turned into invocations.
//!
//! A generated fleet ([`fleet`]), every number drawn from the seed:
//! - mean rates spread log-uniformly over `rate_spread` decades below `max_rate` (stratified: the
//!   i-th fastest function sits in the i-th slice of the range, so the fleet's total is much the
//!   same from seed to seed);
//! - kinds: about 30% of the functions invoked once a minute or less are timers (a fixed period
//!   from the usual cron steps, 1 minute to 1 day, nearest to its rate; fired on a whole minute of
//!   the period, each firing a little late: 0.2 s on average); of the rest, a quarter are queue
//!   triggers (arrivals in batches of 2 to 10 on average, a few tens of milliseconds apart) and
//!   the others HTTP (Poisson arrivals);
//! - diurnal swings for HTTP and queue functions: the rate times 1 + a sin(2 pi t / trace + phase)
//!   with a in [0, 0.8) (a day compressed into the trace, as for the `diurnal` shape);
//! - bursts: `burst_share` of the non-timer functions also take bursts, `bursts_per_hour` of them
//!   over the whole fleet (a Poisson process per bursty function): 50 to 500 invocations
//!   (log-uniform) spread evenly at random over 1 to 5 seconds;
//! - durations log-normal: a per-function median log-normal around 0.6 s (sigma 1.2 in ln, within
//!   5 ms and 2 min), each invocation's spread around it sigma 0.3 to 1.0, within 1 ms and 15 min.

use super::trace::{Invocation, Rng};

/// What a generated fleet looks like (see the module's description).
#[derive(Clone, Debug, PartialEq)]
pub struct FleetParams {
    pub functions: u32,
    pub seconds: f64,
    /// The mean rate of the fastest function, per second.
    pub max_rate: f64,
    /// Decades between the fastest and the slowest function's mean rate.
    pub rate_spread: f64,
    /// Bursts over the whole fleet, per hour.
    pub bursts_per_hour: f64,
    /// The share of non-timer functions that take bursts.
    pub burst_share: f64,
    pub seed: u64,
}

impl Default for FleetParams {
    /// 169 functions over an hour: about 1.5 million invocations.
    fn default() -> Self {
        Self {
            functions: 169,
            seconds: 3600.0,
            max_rate: 45.0,
            rate_spread: 8.0,
            bursts_per_hour: 10.0,
            burst_share: 0.1,
            seed: 1,
        }
    }
}

impl FleetParams {
    /// Checks the parameters; the message is for the command line.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=100_000).contains(&self.functions) {
            return Err("--functions must be between 1 and 100000".into());
        }
        let checks = [
            ("--seconds", self.seconds, 1e-3, 7.0 * 86_400.0),
            ("--max-rate", self.max_rate, 1e-9, 1e5),
            ("--rate-spread", self.rate_spread, 0.0, 12.0),
            ("--bursts-per-hour", self.bursts_per_hour, 0.0, 1e5),
            ("--burst-share", self.burst_share, 0.0, 1.0),
        ];
        for (flag, v, lo, hi) in checks {
            if !(v.is_finite() && v >= lo && v <= hi) {
                return Err(format!("{flag} {v} is not in [{lo}, {hi}]"));
            }
        }
        // About 50 bytes an invocation in memory: refuse what cannot be held.
        let expected = self.max_rate * self.seconds * f64::from(self.functions).min(30.0);
        if expected > 2e8 {
            return Err(format!("about {expected:.0} invocations: too many (at most 2e8)"));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Http,
    Queue,
    Timer { period: f64, phase: f64 },
}

/// The cron steps a timer function's period is taken from, in seconds.
const TIMER_PERIODS: [f64; 12] =
    [60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 14_400.0, 21_600.0, 43_200.0, 86_400.0];

/// A generated fleet (see the module's description), sorted by arrival.
pub fn fleet(p: &FleetParams) -> Vec<Invocation> {
    let mut rng = Rng::new(p.seed);
    let n = p.functions as usize;
    // Stratified rates: a shuffled slot per function.
    let mut slots: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        slots.swap(i, rng.below(i + 1));
    }
    let mut out = Vec::new();
    let mut bursty = Vec::new();
    let mut functions = Vec::with_capacity(n);
    for (i, &slot) in slots.iter().enumerate() {
        let mut rate = p.max_rate * 10f64.powf(-p.rate_spread * (slot as f64 + rng.next_f64()) / n as f64);
        let kind = if rate <= 1.0 / 60.0 && rng.next_f64() < 0.3 {
            let period = *TIMER_PERIODS
                .iter()
                .min_by(|a, b| (a.ln() + rate.ln()).abs().total_cmp(&(b.ln() + rate.ln()).abs()))
                .unwrap_or(&60.0);
            rate = 1.0 / period;
            Kind::Timer { period, phase: 60.0 * rng.below((period / 60.0) as usize) as f64 }
        } else if rng.next_f64() < 0.25 {
            Kind::Queue
        } else {
            Kind::Http
        };
        let takes_bursts = !matches!(kind, Kind::Timer { .. }) && rng.next_f64() < p.burst_share;
        let name = match kind {
            Kind::Timer { .. } => format!("timer-{i:03}"),
            Kind::Queue if takes_bursts => format!("queue-burst-{i:03}"),
            Kind::Queue => format!("queue-{i:03}"),
            Kind::Http if takes_bursts => format!("http-burst-{i:03}"),
            Kind::Http => format!("http-{i:03}"),
        };
        let median = (0.6f64.ln() + 1.2 * rng.normal()).exp().clamp(0.005, 120.0);
        let sigma = 0.3 + 0.7 * rng.next_f64();
        let (amplitude, phase) = (0.8 * rng.next_f64(), 2.0 * std::f64::consts::PI * rng.next_f64());
        if takes_bursts {
            bursty.push(i);
        }
        functions.push((name, kind, rate, median, sigma, amplitude, phase));
    }
    let burst_rate = if bursty.is_empty() { 0.0 } else { p.bursts_per_hour / 3600.0 / bursty.len() as f64 };
    for (i, (name, kind, rate, median, sigma, amplitude, phase)) in functions.into_iter().enumerate() {
        let mut arrivals = Vec::new();
        let diurnal = |t: f64| 1.0 + amplitude * (2.0 * std::f64::consts::PI * t / p.seconds + phase).sin();
        match kind {
            Kind::Timer { period, phase } => {
                let mut t = phase;
                while t < p.seconds {
                    arrivals.push(t + rng.exp(0.2));
                    t += period;
                }
            }
            Kind::Http => {
                // Thinning: candidates at the peak rate, kept with probability rate(t) / peak.
                let peak = rate * (1.0 + amplitude);
                let mut t = rng.exp(1.0 / peak);
                while t < p.seconds {
                    if rng.next_f64() * (1.0 + amplitude) < diurnal(t) {
                        arrivals.push(t);
                    }
                    t += rng.exp(1.0 / peak);
                }
            }
            Kind::Queue => {
                let batch = 2.0 + 8.0 * rng.next_f64();
                let peak = rate / batch * (1.0 + amplitude);
                let mut t = rng.exp(1.0 / peak);
                while t < p.seconds {
                    if rng.next_f64() * (1.0 + amplitude) < diurnal(t) {
                        let mut at = t;
                        for _ in 0..1 + rng.poisson(batch - 1.0) {
                            arrivals.push(at);
                            at += rng.exp(0.03);
                        }
                    }
                    t += rng.exp(1.0 / peak);
                }
            }
        }
        if bursty.contains(&i) {
            let mut t = rng.exp(1.0 / burst_rate);
            while t < p.seconds {
                let size = 10f64.powf(50f64.log10() + rng.next_f64() * 10f64.log10()).round() as u32;
                let length = 1.0 + 4.0 * rng.next_f64();
                arrivals.extend((0..size).map(|_| t + length * rng.next_f64()));
                t += rng.exp(1.0 / burst_rate);
            }
        }
        for arrival in arrivals.into_iter().filter(|&a| a < p.seconds) {
            let duration = (median * (sigma * rng.normal()).exp()).clamp(0.001, 900.0);
            out.push(Invocation { arrival, function: name.clone(), duration });
        }
    }
    out.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
    out
}

/// Which part of an Azure Functions 2019 trace to take.
#[derive(Clone, Debug, PartialEq)]
pub struct AzureSelection {
    /// Minutes of the day file, `first..end` (0-based; the file has 1440).
    pub minutes: std::ops::Range<usize>,
    /// At most this many functions (among those invoked in `minutes`), drawn with `seed`; all
    /// when `None`.
    pub functions: Option<usize>,
    pub seed: u64,
}

impl Default for AzureSelection {
    fn default() -> Self {
        Self { minutes: 0..1440, functions: None, seed: 1 }
    }
}

/// A duration distribution from the trace's percentiles (milliseconds): 0, 1, 25, 50, 75, 99, 100.
type Percentiles = [f64; 7];
const PERCENTILE_AT: [f64; 7] = [0.0, 0.01, 0.25, 0.5, 0.75, 0.99, 1.0];

fn sample_duration(rng: &mut Rng, p: &Percentiles) -> f64 {
    let u = rng.next_f64();
    let i = PERCENTILE_AT.iter().rposition(|&q| q <= u).unwrap_or(0).min(5);
    let f = (u - PERCENTILE_AT[i]) / (PERCENTILE_AT[i + 1] - PERCENTILE_AT[i]);
    ((p[i] + f * (p[i + 1] - p[i])) / 1e3).max(1e-3)
}

/// Splits a CSV line (the trace's fields have no quotes or commas inside).
fn fields(line: &str) -> Vec<&str> {
    line.split(',').map(str::trim).collect()
}

/// The Azure Functions 2019 trace's invocation counts (`invocations_per_function_md.anon.dNN.csv`)
/// as invocations, with durations drawn from its duration percentiles
/// (`function_durations_percentiles.anon.dNN.csv`, when given; a function without a row there
/// gets the median of the others' medians, or 1 s). A minute's invocations arrive spread at
/// random over the minute, a timer's at even steps from the minute's start (the trace only says
/// how many there were in each minute). Function names: `TRIGGER-APP-FUNCTION` with the first 8
/// characters of each hash. Times start at the first selected minute.
pub fn azure(invocations: &str, durations: Option<&str>, sel: &AzureSelection) -> Result<Vec<Invocation>, String> {
    let mut lines = invocations.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().ok_or("the invocations file is empty")?;
    let head = fields(header);
    let col = |name: &str| head.iter().position(|h| *h == name);
    let (Some(app), Some(func), Some(trigger), Some(first)) =
        (col("HashApp"), col("HashFunction"), col("Trigger"), col("1"))
    else {
        return Err(
            "the invocations file's header lacks HashApp, HashFunction, Trigger or the minute columns 1..1440".into()
        );
    };
    let minutes = head.len() - first;
    if sel.minutes.start >= sel.minutes.end || sel.minutes.end > minutes {
        return Err(format!("minutes {:?} are not within the file's {minutes}", sel.minutes));
    }
    let mut percentiles = std::collections::HashMap::new();
    if let Some(text) = durations {
        let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
        let (_, header) = lines.next().ok_or("the durations file is empty")?;
        let head = fields(header);
        let col = |name: &str| head.iter().position(|h| *h == name);
        let names = ["0", "1", "25", "50", "75", "99", "100"].map(|p| col(&format!("percentile_Average_{p}")));
        let (Some(app), Some(func)) = (col("HashApp"), col("HashFunction")) else {
            return Err("the durations file's header lacks HashApp or HashFunction".into());
        };
        if names.iter().any(Option::is_none) {
            return Err("the durations file's header lacks percentile_Average_{0,1,25,50,75,99,100}".into());
        }
        for (i, line) in lines {
            let f = fields(line);
            let bad = || format!("durations line {}: expected {} fields of the header's", i + 1, head.len());
            if f.len() != head.len() {
                return Err(bad());
            }
            let mut p = [0.0; 7];
            for (slot, c) in p.iter_mut().zip(names) {
                let v: f64 = f[c.unwrap_or(0)].parse().map_err(|_| bad())?;
                if !(v.is_finite() && v >= 0.0) {
                    return Err(bad());
                }
                *slot = v;
            }
            p.sort_by(f64::total_cmp);
            percentiles.insert((f[app].to_string(), f[func].to_string()), p);
        }
    }
    let mut medians: Vec<f64> = percentiles.values().map(|p| p[3]).collect();
    medians.sort_by(f64::total_cmp);
    let fallback = medians.get(medians.len() / 2).map_or([1000.0; 7], |&m| [m; 7]);
    let mut rows = Vec::new();
    for (i, line) in lines {
        let f = fields(line);
        if f.len() != head.len() {
            return Err(format!("invocations line {}: {} fields, the header has {}", i + 1, f.len(), head.len()));
        }
        let mut counts = Vec::with_capacity(sel.minutes.len());
        for c in &f[first + sel.minutes.start..first + sel.minutes.end] {
            counts.push(c.parse::<u32>().map_err(|_| format!("invocations line {}: bad count {c:?}", i + 1))?);
        }
        if counts.iter().any(|&c| c > 0) {
            let short = |h: &str| h.chars().take(8).collect::<String>();
            let name = format!("{}-{}-{}", f[trigger], short(f[app]), short(f[func]));
            if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(format!("invocations line {}: a trigger or hash with odd characters", i + 1));
            }
            let p = percentiles.get(&(f[app].to_string(), f[func].to_string())).copied().unwrap_or(fallback);
            rows.push((name, f[trigger] == "timer", counts, p));
        }
    }
    let mut rng = Rng::new(sel.seed);
    if let Some(n) = sel.functions {
        for i in (1..rows.len()).rev() {
            rows.swap(i, rng.below(i + 1));
        }
        rows.truncate(n);
    }
    let total: u64 = rows.iter().flat_map(|r| r.2.iter()).map(|&c| u64::from(c)).sum();
    if total > 200_000_000 {
        return Err(format!("{total} invocations selected: too many (at most 2e8); take fewer minutes or functions"));
    }
    let mut out = Vec::with_capacity(total as usize);
    for (name, timer, counts, p) in rows {
        for (m, &c) in counts.iter().enumerate() {
            for k in 0..c {
                let within = if timer { 60.0 * f64::from(k) / f64::from(c) } else { 60.0 * rng.next_f64() };
                let duration = sample_duration(&mut rng, &p);
                out.push(Invocation { arrival: 60.0 * m as f64 + within, function: name.clone(), duration });
            }
        }
    }
    out.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn per_function(t: &[Invocation]) -> BTreeMap<&str, Vec<f64>> {
        let mut m: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for i in t {
            m.entry(&i.function).or_default().push(i.arrival);
        }
        m
    }

    #[test]
    fn a_generated_fleet_has_the_shape_asked_for() {
        let p = FleetParams { functions: 60, seconds: 600.0, max_rate: 20.0, ..Default::default() };
        let t = fleet(&p);
        assert_eq!(t, fleet(&p), "not reproducible");
        assert_ne!(t, fleet(&FleetParams { seed: 2, ..p.clone() }));
        assert!(t.windows(2).all(|w| w[0].arrival <= w[1].arrival));
        assert!(t.iter().all(|i| i.arrival >= 0.0 && i.arrival < 600.0 && i.duration > 0.0));
        let m = per_function(&t);
        // Rates over 8 decades: the busiest function has thousands, many have none or a few.
        let counts: Vec<usize> = m.values().map(Vec::len).collect();
        assert!(counts.iter().max().unwrap() > &5_000, "{counts:?}");
        assert!(m.len() < 60, "every function was invoked within 10 minutes");
        // Timers fire at their period.
        let timers: Vec<&Vec<f64>> =
            m.iter().filter(|(n, v)| n.starts_with("timer") && v.len() > 2).map(|e| e.1).collect();
        for a in timers {
            let gaps: Vec<f64> = a.windows(2).map(|w| w[1] - w[0]).collect();
            assert!(gaps.iter().all(|g| (g - gaps[0]).abs() < 5.0), "{gaps:?}");
        }
        // Bursts: some second has hundreds more than the fleet's base.
        let mut per_s: BTreeMap<(String, u64), u32> = BTreeMap::new();
        for i in t.iter().filter(|i| i.function.contains("burst")) {
            *per_s.entry((i.function.clone(), i.arrival as u64)).or_default() += 1;
        }
        assert!(per_s.values().max().copied().unwrap_or(0) >= 10, "no burst");
    }

    #[test]
    fn the_default_fleet_is_about_a_million_and_a_half_invocations() {
        // Shortened to a tenth of the hour: the rates are what is checked.
        let p = FleetParams { seconds: 360.0, ..Default::default() };
        let n = fleet(&p).len();
        assert!((120_000..200_000).contains(&n), "{n}");
    }

    #[test]
    fn bad_fleet_parameters_are_refused() {
        let ok = FleetParams::default();
        assert!(ok.validate().is_ok());
        for bad in [
            FleetParams { functions: 0, ..ok.clone() },
            FleetParams { seconds: f64::NAN, ..ok.clone() },
            FleetParams { max_rate: -1.0, ..ok.clone() },
            FleetParams { rate_spread: 40.0, ..ok.clone() },
            FleetParams { burst_share: 2.0, ..ok.clone() },
            FleetParams { max_rate: 1e5, seconds: 86_400.0, ..ok.clone() },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    const INVOCATIONS: &str = "HashOwner,HashApp,HashFunction,Trigger,1,2,3\n\
        o1,app11111111,fun11111111,http,0,3,1\n\
        o1,app11111111,fun22222222,timer,1,1,2\n\
        o2,app33333333,fun33333333,queue,0,0,0\n";
    const DURATIONS: &str = "HashOwner,HashApp,HashFunction,Average,Count,Minimum,Maximum,percentile_Average_0,\
        percentile_Average_1,percentile_Average_25,percentile_Average_50,percentile_Average_75,\
        percentile_Average_99,percentile_Average_100\n\
        o1,app11111111,fun11111111,100,4,10,500,10,10,50,100,150,400,500\n";

    #[test]
    fn azure_counts_become_invocations() {
        let t = azure(INVOCATIONS, Some(DURATIONS), &AzureSelection::default().with_minutes(0..3)).unwrap();
        let m = per_function(&t);
        assert_eq!(m.len(), 2, "the function with no invocations is left out");
        let http = &m["http-app11111-fun11111"];
        assert_eq!(http.len(), 4);
        assert!(http[..3].iter().all(|&a| (60.0..120.0).contains(&a)) && http[3] >= 120.0);
        // A timer's invocations in a minute are evenly spaced from its start.
        assert_eq!(m["timer-app11111-fun22222"], vec![0.0, 60.0, 120.0, 150.0]);
        for i in &t {
            if i.function.starts_with("http") {
                assert!((0.01..=0.5).contains(&i.duration), "{i:?}");
            } else {
                assert!((0.01..=0.5).contains(&i.duration), "the others' median: {i:?}");
            }
        }
        // Minutes select, and times start at the first one taken.
        let t = azure(INVOCATIONS, None, &AzureSelection::default().with_minutes(2..3)).unwrap();
        assert_eq!(t.len(), 3);
        assert!(t.iter().all(|i| i.arrival < 60.0 && i.duration == 1.0));
        let t = azure(
            INVOCATIONS,
            None,
            &AzureSelection { functions: Some(1), ..AzureSelection::default().with_minutes(0..3) },
        );
        assert_eq!(per_function(&t.unwrap()).len(), 1);
    }

    #[test]
    fn bad_azure_files_are_refused_with_the_line() {
        let sel = AzureSelection::default().with_minutes(0..3);
        for (inv, dur, why) in [
            ("", None, "empty"),
            ("a,b,c\n", None, "header"),
            ("HashOwner,HashApp,HashFunction,Trigger,1,2,3\no,a,f,http,1,x,0\n", None, "line 2"),
            ("HashOwner,HashApp,HashFunction,Trigger,1,2,3\no,a,f,http,1\n", None, "line 2"),
            ("HashOwner,HashApp,HashFunction,Trigger,1,2,3\no,a,f,ht\"tp,1,1,1\n", None, "odd"),
            (INVOCATIONS, Some("HashApp,HashFunction\n"), "percentile"),
        ] {
            let e = azure(inv, dur, &sel).unwrap_err();
            assert!(e.contains(why), "{inv:?}: {e}");
        }
        let mut dur = DURATIONS.to_string();
        dur.push_str("o1,a,f,1,1,1,1,1,1,1,NaN,1,1,1\n");
        assert!(azure(INVOCATIONS, Some(&dur), &sel).unwrap_err().contains("durations line 3"));
        assert!(azure(INVOCATIONS, None, &AzureSelection::default().with_minutes(0..4))
            .unwrap_err()
            .contains("minutes"));
    }

    impl AzureSelection {
        fn with_minutes(self, minutes: std::ops::Range<usize>) -> Self {
            Self { minutes, ..self }
        }
    }
}
