//! The agents' answers: pure functions of their inputs (no clock, no randomness), so a test or a
//! person watching the demo can tell exactly who answered what. Each answer starts with the
//! agent's name so that, behind a load balancer, the serving instance is visible.

/// Longest city, airport or date string accepted.
const MAX_PLACE: usize = 100;
/// Longest prompt accepted by `chat`.
const MAX_PROMPT: usize = 20_000;

/// FNV-1a over the case-folded text: a stable hash, the same on every platform and run.
fn stable_hash(text: &str) -> u64 {
    text.trim()
        .chars()
        .flat_map(char::to_lowercase)
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, c| {
            let mut buf = [0u8; 4];
            c.encode_utf8(&mut buf).bytes().fold(hash, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
            })
        })
}

/// Picks `items[(hash >> shift) % len]`; `items` is one of the constant, non-empty tables here.
fn pick<T: Copy>(items: &[T], hash: u64, shift: u32) -> T {
    items[((hash >> shift) % items.len() as u64) as usize]
}

/// A place name as typed, trimmed; refused when empty or absurdly long.
fn place<'a>(field: &str, value: &'a str) -> Result<&'a str, String> {
    let value = value.trim();
    if value.is_empty() || value.chars().count() > MAX_PLACE {
        return Err(format!(
            "{field} must be a name of 1 to {MAX_PLACE} characters, e.g. \"Lisbon\"; got {value:?}"
        ));
    }
    Ok(value)
}

/// The weather in `city`, as agent `name` reports it.
pub(crate) fn weather(name: &str, city: &str) -> Result<String, String> {
    let city = place("city", city)?;
    // A few well-known cities get their postcard weather; the rest a stable pseudo-forecast.
    let known = match city.to_lowercase().as_str() {
        "lisbon" | "lisboa" => Some(("sunny", 24)),
        "porto" => Some(("partly cloudy", 21)),
        "madrid" => Some(("sunny", 29)),
        "paris" => Some(("cloudy", 17)),
        "london" => Some(("light rain", 14)),
        "berlin" => Some(("partly cloudy", 19)),
        "tokyo" => Some(("humid and cloudy", 26)),
        _ => None,
    };
    let (sky, celsius) = known.unwrap_or_else(|| {
        let hash = stable_hash(city);
        let sky = pick(
            &["sunny", "partly cloudy", "cloudy", "light rain", "windy"],
            hash,
            0,
        );
        (sky, 8 + ((hash >> 8) % 22) as i64)
    });
    Ok(format!("{name}: {sky}, {celsius}°C in {city}"))
}

/// Checks that `date` looks like `YYYY-MM-DD` with a plausible month and day.
fn date(value: &str) -> Result<&str, String> {
    let value = value.trim();
    let bytes = value.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        bytes
            .get(range)
            .filter(|b| b.iter().all(u8::is_ascii_digit))
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|s| s.parse::<u32>().ok())
    };
    let ok = bytes.len() == 10
        && bytes[4] == b'-'
        && bytes[7] == b'-'
        && digits(0..4).is_some()
        && digits(5..7).is_some_and(|m| (1..=12).contains(&m))
        && digits(8..10).is_some_and(|d| (1..=31).contains(&d));
    if ok {
        Ok(value)
    } else {
        Err(format!(
            "date must be a day written YYYY-MM-DD, e.g. \"2026-06-12\"; got {value:?}"
        ))
    }
}

/// Three flights from `origin` to `destination` on `date`, with the cheapest named.
pub(crate) fn flights(
    name: &str,
    origin: &str,
    destination: &str,
    day: &str,
) -> Result<String, String> {
    let origin = place("origin", origin)?;
    let destination = place("destination", destination)?;
    let day = date(day)?;
    if origin.eq_ignore_ascii_case(destination) {
        return Err(format!(
            "origin and destination are both {origin:?}: pick two different places"
        ));
    }
    let hash = stable_hash(&format!("{origin}|{destination}|{day}"));
    let carriers = ["CM", "TP", "LH", "BA", "AF", "IB", "KL"];
    let offers: Vec<(String, String, u64)> = (0..3u32)
        .map(|i| {
            let h = hash.rotate_left(i * 21);
            let flight = format!("{} {}", pick(&carriers, h, 0), 100 + (h >> 4) % 900);
            let hour = 6 + 5 * u64::from(i) + (h >> 16) % 3;
            let minute = ((h >> 20) % 12) * 5;
            let price = 60 + (h >> 28) % 240;
            (flight, format!("{hour:02}:{minute:02}"), price)
        })
        .collect();
    let listed = offers
        .iter()
        .map(|(flight, time, price)| format!("{flight} {time} €{price}"))
        .collect::<Vec<_>>()
        .join(", ");
    let cheapest = offers
        .iter()
        .min_by_key(|(_, _, price)| *price)
        .map(|(flight, _, price)| format!("; cheapest {flight} at €{price}"))
        .unwrap_or_default();
    Ok(format!(
        "{name}: 3 flights {origin} → {destination} on {day}: {listed}{cheapest}"
    ))
}

/// Finds the place a prompt is about: the capitalised words after "to", "for", "in" or "visit".
fn city_in(prompt: &str) -> Option<String> {
    let words: Vec<&str> = prompt.split_whitespace().collect();
    let capitalised = |w: &str| w.chars().next().is_some_and(char::is_uppercase);
    let trim = |w: &str| {
        w.trim_matches(|c: char| !c.is_alphanumeric() && c != '-' && c != '\'')
            .to_owned()
    };
    words.windows(2).enumerate().find_map(|(i, pair)| {
        let cue = pair[0].to_lowercase();
        if !matches!(cue.as_str(), "to" | "for" | "in" | "visit" | "visiting")
            || !capitalised(pair[1])
        {
            return None;
        }
        // Take "New York" whole, but stop at punctuation ("Lisbon. Weather: ...").
        let mut parts = Vec::new();
        for word in &words[i + 1..] {
            if !capitalised(word) || parts.len() == 3 {
                break;
            }
            parts.push(trim(word));
            if word.ends_with(|c: char| !c.is_alphanumeric()) {
                break;
            }
        }
        let city = parts.join(" ");
        (!city.is_empty()).then_some(city)
    })
}

/// The number of days a prompt asks for ("3-day", "5 days"), 1 to 14; 3 when it does not say.
fn days_in(prompt: &str) -> usize {
    let words: Vec<String> = prompt
        .split_whitespace()
        .map(|w| w.to_lowercase())
        .collect();
    words
        .iter()
        .enumerate()
        .find_map(|(i, word)| {
            let number = word
                .strip_suffix("-day")
                .or_else(|| word.strip_suffix("-days"))
                .or_else(|| {
                    words
                        .get(i + 1)
                        .filter(|next| next.starts_with("day"))
                        .map(|_| word.as_str())
                })?;
            number
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=14).contains(n))
        })
        .unwrap_or(3)
}

/// The model's reply to `prompt`: an itinerary when the prompt names a place, else an echo.
pub(crate) fn chat(name: &str, model: &str, prompt: &str) -> Result<String, String> {
    let prompt = prompt.trim();
    if prompt.is_empty() || prompt.chars().count() > MAX_PROMPT {
        return Err(format!(
            "prompt must hold 1 to {MAX_PROMPT} characters, e.g. \"Plan a 3-day trip to Lisbon\""
        ));
    }
    let Some(city) = city_in(prompt) else {
        let preview: String = prompt.chars().take(60).collect();
        let ellipsis = if prompt.chars().count() > 60 {
            "…"
        } else {
            ""
        };
        return Ok(format!(
            "[{model} via {name}] You said \"{preview}{ellipsis}\" ({} words). \
             Ask me to plan a trip to a city and I will write an itinerary.",
            prompt.split_whitespace().count()
        ));
    };
    let days = days_in(prompt);
    let activities = [
        "walk the old town and eat where the locals eat",
        "visit the main museum, then a riverside dinner",
        "take the tram up to the viewpoints at sunset",
        "spend the day at the market and a cooking class",
        "take a day trip to the coast",
        "tour the castle and the cathedral",
        "rent bikes along the waterfront",
        "see a concert and try the night food stalls",
    ];
    let hash = stable_hash(&city);
    let plan = (0..days)
        .map(|day| {
            let activity = pick(&activities, hash.wrapping_add(day as u64), 0);
            format!("Day {}: {activity}", day + 1)
        })
        .collect::<Vec<_>>()
        .join("; ");
    let lower = prompt.to_lowercase();
    let tip = if lower.contains("rain") {
        " Pack an umbrella."
    } else if lower.contains("sunny") {
        " Bring sunscreen."
    } else {
        ""
    };
    let flight = if lower.contains("cheapest") {
        " Book the cheapest flight early."
    } else {
        ""
    };
    Ok(format!(
        "[{model} via {name}] Here is a {days}-day plan for {city}: {plan}.{tip}{flight}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weather_is_stable_and_names_the_agent() {
        assert_eq!(
            weather("weather-eu", " Lisbon ").as_deref(),
            Ok("weather-eu: sunny, 24°C in Lisbon")
        );
        let a = weather("w", "Reykjavik");
        assert_eq!(
            a,
            weather("w", "reykjavik").map(|s| s.replace("reykjavik", "Reykjavik"))
        );
        assert!(weather("w", "  ").is_err());
        assert!(weather("w", &"x".repeat(101)).is_err());
    }

    #[test]
    fn flights_are_stable_and_checked() {
        let first = flights("fl", "Berlin", "Lisbon", "2026-06-12");
        assert_eq!(first, flights("fl", "Berlin", "Lisbon", "2026-06-12"));
        let text = first.unwrap_or_default();
        assert!(
            text.starts_with("fl: 3 flights Berlin → Lisbon on 2026-06-12: "),
            "{text}"
        );
        assert!(text.contains("; cheapest "), "{text}");
        assert_ne!(
            flights("fl", "Berlin", "Lisbon", "2026-06-13"),
            flights("fl", "Berlin", "Lisbon", "2026-06-12")
        );
        assert!(flights("fl", "Berlin", "berlin", "2026-06-12").is_err());
        for bad in ["tomorrow", "2026-13-01", "2026-06-32", "2026/06/12", ""] {
            assert!(flights("fl", "Berlin", "Lisbon", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn chat_plans_the_city_the_prompt_names() {
        let answer = chat(
            "llm-claude",
            "claude-sonnet",
            "Plan a 3-day trip to Lisbon. Weather: sunny.",
        )
        .unwrap_or_default();
        assert!(
            answer.starts_with(
                "[claude-sonnet via llm-claude] Here is a 3-day plan for Lisbon: Day 1: "
            ),
            "{answer}"
        );
        assert!(
            answer.contains("Day 3: ") && !answer.contains("Day 4"),
            "{answer}"
        );
        assert!(answer.ends_with("Bring sunscreen."), "{answer}");
        assert_eq!(
            city_in("a weekend in New York, please").as_deref(),
            Some("New York")
        );
        assert_eq!(days_in("a 5 day trip"), 5);
        assert_eq!(days_in("a 99-day trip"), 3);
    }

    #[test]
    fn chat_echoes_prompts_without_a_place() {
        let answer = chat("llm", "gpt-4o", "hello there").unwrap_or_default();
        assert!(answer.starts_with("[gpt-4o via llm] You said \"hello there\" (2 words)."));
        assert!(chat("llm", "gpt-4o", " ").is_err());
    }
}
