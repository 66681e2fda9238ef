//! Helpers shared by the unit tests of the LLM summarizer.

use super::*;
use crate::summarize::Message;
use async_openai::types::chat::ChatCompletionRequestMessage;

// ---- helpers --------------------------------------------------------------------------------------------

/// A tiny deterministic generator (xorshift64*), so tests need no `rand`.
pub(super) struct Rng(pub(super) u64);
impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub(super) fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    pub(super) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

pub(super) const T0: i64 = 1_795_651_200_000; // 2026-11-26 00:00:00 UTC

pub(super) fn msg(
    i: usize,
    role: &str,
    text: &str,
    emotion: Option<&str>,
    vector: Vec<f32>,
) -> Message {
    Message {
        point_id: format!("00000000-0000-4000-8000-{i:012}"),
        role: role.into(),
        text: text.into(),
        ts_ms: T0 + 14 * 3_600_000 + i as i64 * 61_000,
        emotion: emotion.map(str::to_string),
        vector,
    }
}

pub(super) fn window(user_id: &str, messages: Vec<Message>) -> WindowInput {
    WindowInput {
        bot: "elena".into(),
        user_id: user_id.into(),
        start_ms: T0,
        end_ms: T0 + 86_400_000,
        messages,
    }
}

pub(super) const LINES: &[(&str, &str, &str)] = &[
    (
        "user",
        "I finally finished my pottery class project, a blue glazed bowl for my grandmother.",
        "joy",
    ),
    (
        "assistant",
        "That sounds beautiful! Your grandmother will love the bowl.",
        "joy",
    ),
    (
        "user",
        "I am nervous about the marathon next month, my knee still hurts after long runs.",
        "anxiety",
    ),
    (
        "assistant",
        "Maybe ask a physiotherapist about the knee before the marathon.",
        "neutral",
    ),
    (
        "user",
        "My sister Lena moved to Lisbon and I miss our Sunday dinners together.",
        "sadness",
    ),
    (
        "user",
        "I started reading a novel about lighthouse keepers in Norway, it is wonderful.",
        "joy",
    ),
    (
        "assistant",
        "Lighthouse stories are so atmospheric. What do you like most about it?",
        "neutral",
    ),
    (
        "user",
        "The quiet. I want to visit a lighthouse in Norway next summer with Lena.",
        "excitement",
    ),
];

pub(super) fn convo(user_id: &str, n: usize, seed: u64) -> WindowInput {
    let mut rng = Rng(seed | 1);
    let ms = (0..n)
        .map(|i| {
            let (role, text, emotion) = LINES[(i + seed as usize) % LINES.len()];
            let v: Vec<f32> = (0..16).map(|_| rng.unit()).collect();
            msg(i, role, text, Some(emotion), v)
        })
        .collect();
    window(user_id, ms)
}

pub(super) fn settings(base_url: &str) -> LlmSettings {
    LlmSettings {
        base_url: base_url.into(),
        api_key: "sk-test-SECRET-KEY-1234".into(),
        model: "recap-test-model".into(),
        concurrency: 4,
        requests_per_second: 200.0,
        timeout: Duration::from_secs(5),
        max_retries: 6,
        max_input_tokens: 8000,
        breaker_failures: 8,
        breaker_cooldown: Duration::from_secs(1),
        retry_base_delay: Duration::from_millis(30),
        retry_max_delay: Duration::from_millis(400),
        price_prompt_per_mtok: 0.0,
        price_completion_per_mtok: 0.0,
        daily_budget_usd: None,
    }
}

pub(super) fn content_of(m: &ChatCompletionRequestMessage) -> String {
    serde_json::to_value(m).unwrap()["content"]
        .as_str()
        .unwrap()
        .to_string()
}
