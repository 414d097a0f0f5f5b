//! Logs go to stdout, one JSON object per line (or human text for local work),
//! each carrying the `trace_id` and `span_id` of the span it was written in.
//!
//! The JSON lines are written by [`JsonLine`] rather than tracing-subscriber's
//! JSON format: that one gathers every field into a map of `serde_json`
//! values before writing, and with the trace ids put in front it was the
//! largest single cost of a warm request (~15 % of its instructions, see
//! `docs/profiling.md`). [`JsonLine`] writes each field straight out, with
//! the same keys in the same order.

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{FilterExt, filter_fn};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{self as tfmt, FmtContext};
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::registry::LookupSpan;

use super::traces;
use crate::config::LogFormat;

/// One access line per answered request: what operators search by request
/// id. No user id and no headers: the bearer token must never reach a log
/// line.
///
/// With the JSON format and the line statically on under `RUST_LOG`, it is
/// written straight to the layer's writer, the same line [`JsonLine`] would
/// write: passing it through `tracing`'s event dispatch (filters, the
/// layer's buffer, the field visitor) cost about as much as writing it
/// (`docs/profiling.md`, "Hot path, round 5"). Until the filter has said so
/// (its first call), and with span-dependent filters, it goes as an event.
pub fn access(method: &str, route: &str, status: u16, latency: Duration, request_id: &str) {
    if let Some(direct) = DIRECT_ACCESS.get() {
        match direct.interest.load(Ordering::Relaxed) {
            ALWAYS => {
                let mut line = String::with_capacity(320);
                if access_line(&mut line, method, route, status, latency, request_id).is_ok() {
                    (direct.write)(line.as_bytes());
                }
                return;
            }
            NEVER => return,
            _ => {}
        }
    }
    tracing::info!(
        target: ACCESS_TARGET,
        method,
        route,
        status,
        latency_ms = latency.as_secs_f64() * 1000.0,
        request_id,
        "request"
    );
}

pub(crate) const ACCESS_TARGET: &str = "moneta::access";

/// What the stdout filter said of the access line's callsite.
const UNKNOWN: u8 = 0;
const ALWAYS: u8 = 1;
const NEVER: u8 = 2;

/// The JSON layer's writer, for access lines written straight out, and what
/// its filter said of them. The first JSON layer built sets it (a process
/// has one).
struct DirectAccess {
    write: WriteLine,
    interest: Arc<AtomicU8>,
}

/// Writes one whole line.
type WriteLine = Box<dyn Fn(&[u8]) + Send + Sync>;

static DIRECT_ACCESS: OnceLock<DirectAccess> = OnceLock::new();

/// `{…, "message":"request", method, route, status, latency_ms, request_id,
/// "target":"moneta::access"}`: the keys and order of the event's line.
fn access_line(
    out: &mut String,
    method: &str,
    route: &str,
    status: u16,
    latency: Duration,
    request_id: &str,
) -> fmt::Result {
    line_start(out, "INFO")?;
    out.push_str(",\"message\":\"request\",\"method\":");
    write_json_str(out, method)?;
    out.push_str(",\"route\":");
    write_json_str(out, route)?;
    out.push_str(",\"status\":");
    write_u64(out, u64::from(status))?;
    // Milliseconds to the microsecond, digit by digit (a float's `Display`
    // was ~1 k instructions a line).
    let micros = latency.as_micros();
    out.push_str(",\"latency_ms\":");
    write_u64(out, u64::try_from(micros / 1000).unwrap_or(u64::MAX))?;
    let frac = u32::try_from(micros % 1000).unwrap_or(0);
    out.push('.');
    out.push(char::from(b'0' + (frac / 100) as u8));
    out.push(char::from(b'0' + (frac / 10 % 10) as u8));
    out.push(char::from(b'0' + (frac % 10) as u8));
    out.push_str(",\"request_id\":");
    write_json_str(out, request_id)?;
    out.push_str(",\"target\":\"moneta::access\"}\n");
    Ok(())
}

/// `{` and the fields every line starts with: the active trace and span ids,
/// the timestamp and the level.
fn line_start(out: &mut impl fmt::Write, level: &str) -> fmt::Result {
    out.write_char('{')?;
    if let Some((trace_id, span_id)) = traces::current_ids() {
        out.write_str("\"trace_id\":\"")?;
        write_hex(out, &trace_id.to_bytes())?;
        out.write_str("\",\"span_id\":\"")?;
        write_hex(out, &span_id.to_bytes())?;
        out.write_str("\",")?;
    }
    out.write_str("\"timestamp\":\"")?;
    write_timestamp(out, SystemTime::now())?;
    out.write_str("\",\"level\":\"")?;
    out.write_str(level)?;
    out.write_char('"')
}

/// The stdout filter, noting what it says of the access line's callsite.
struct NotingAccess<F> {
    inner: F,
    interest: Arc<AtomicU8>,
}

impl<S, F: Filter<S>> Filter<S> for NotingAccess<F> {
    fn enabled(&self, meta: &Metadata<'_>, cx: &Context<'_, S>) -> bool {
        self.inner.enabled(meta, cx)
    }
    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        let interest = self.inner.callsite_enabled(meta);
        if meta.target() == ACCESS_TARGET && *meta.level() == Level::INFO && meta.is_event() {
            let noted = if interest.is_always() {
                ALWAYS
            } else if interest.is_never() {
                NEVER
            } else {
                UNKNOWN
            };
            self.interest.store(noted, Ordering::Relaxed);
        }
        interest
    }
    fn event_enabled(&self, event: &Event<'_>, cx: &Context<'_, S>) -> bool {
        self.inner.event_enabled(event, cx)
    }
    fn max_level_hint(&self) -> Option<LevelFilter> {
        self.inner.max_level_hint()
    }
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        self.inner.on_new_span(attrs, id, ctx);
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        self.inner.on_record(id, values, ctx);
    }
    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        self.inner.on_enter(id, ctx);
    }
    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        self.inner.on_exit(id, ctx);
    }
    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        self.inner.on_close(id, ctx);
    }
}

/// `{"trace_id":…,"span_id":…,"timestamp":…,"level":…,<fields>,"target":…}`.
struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        line_start(&mut writer, meta.level().as_str())?;
        let mut fields = JsonFieldsVisitor {
            out: &mut writer,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_str(",\"target\":")?;
        write_json_str(&mut writer, meta.target())?;
        writer.write_str("}\n")
    }
}

/// Writes each field as `,"name":value`.
struct JsonFieldsVisitor<'a, W: fmt::Write> {
    out: &'a mut W,
    result: fmt::Result,
}

impl<W: fmt::Write> JsonFieldsVisitor<'_, W> {
    fn key(&mut self, field: &Field) -> fmt::Result {
        self.out.write_char(',')?;
        write_json_str(self.out, field.name())?;
        self.out.write_char(':')
    }

    fn field(&mut self, field: &Field, value: impl FnOnce(&mut W) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|()| value(self.out));
        }
    }
}

impl<W: fmt::Write> Visit for JsonFieldsVisitor<'_, W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |out| write_json_str(out, value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |out| {
            if value < 0 {
                out.write_char('-')?;
            }
            write_u64(out, value.unsigned_abs())
        });
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |out| write_u64(out, value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |out| write!(out, "{value}"));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity; serde_json writes `null` for them too.
        self.field(field, |out| {
            if value.is_finite() {
                write!(out, "{value}")
            } else {
                out.write_str("null")
            }
        });
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.field(field, |out| {
            out.write_char('"')?;
            write!(Escaping(out), "{value}")?;
            out.write_char('"')
        });
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |out| {
            out.write_char('"')?;
            write!(Escaping(out), "{value:?}")?;
            out.write_char('"')
        });
    }
}

fn write_json_str(out: &mut impl fmt::Write, s: &str) -> fmt::Result {
    out.write_char('"')?;
    Escaping(out).write_str(s)?;
    out.write_char('"')
}

/// Lower-case hex, as the trace ids' `Display` writes them (`{:032x}`
/// through `write!` was ~1 k instructions a line).
fn write_hex(out: &mut impl fmt::Write, bytes: &[u8]) -> fmt::Result {
    let mut buf = [0u8; 32];
    let hex = buf.get_mut(..bytes.len() * 2).ok_or(fmt::Error)?;
    hex::encode_to_slice(bytes, hex).map_err(|_| fmt::Error)?;
    out.write_str(std::str::from_utf8(hex).map_err(|_| fmt::Error)?)
}

/// Decimal digits of `value`, without the formatting machinery.
fn write_u64(out: &mut impl fmt::Write, value: u64) -> fmt::Result {
    out.write_str(itoa::Buffer::new().format(value))
}

/// Whether a JSON string needs `b` escaped.
fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Escapes what it is given for the inside of a JSON string.
struct Escaping<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let bytes = s.as_bytes();
        // Nearly every string (names, routes, ids) needs no escape: one pass
        // without early exit, which the compiler vectorizes, then one write.
        if !bytes.iter().fold(false, |any, &b| any | needs_escape(b)) {
            return self.0.write_str(s);
        }
        let mut start = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f => "",
                _ => continue,
            };
            // `i` is at an ASCII byte, so both slices end on char boundaries.
            self.0.write_str(&s[start..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            start = i + 1;
        }
        self.0.write_str(&s[start..])
    }
}

/// RFC 3339 in UTC with microseconds, as tracing-subscriber writes it
/// (`2026-11-29T21:16:52.934927Z`), digit by digit: `write!` with seven
/// padded arguments cost more than the rest of the line.
fn write_timestamp(out: &mut impl fmt::Write, at: SystemTime) -> fmt::Result {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    let mut buf = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut value: u64| {
        for i in (at..at + width).rev() {
            buf[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year.clamp(0, 9999) as u64);
    put(5, 2, u64::from(month));
    put(8, 2, u64::from(day));
    put(11, 2, rem / 3600);
    put(14, 2, rem % 3600 / 60);
    put(17, 2, rem % 60);
    put(20, 6, u64::from(since.subsec_micros()));
    // Only ASCII digits and separators were written.
    out.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Puts the active trace and span ids in front of the text format's lines.
struct TextWithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for TextWithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if let Some((trace_id, span_id)) = traces::current_ids() {
            write!(writer, "trace_id={trace_id} span_id={span_id} ")?;
        }
        self.0.format_event(ctx, writer, event)
    }
}

/// The stdout layer, filtered by `RUST_LOG` on its own so that the level of
/// logs never decides which spans are traced. Lines do not list span fields,
/// so the layer skips spans altogether rather than format their fields on
/// every request. Access lines reach stdout in batches (`stdout.rs`).
pub(crate) fn layer<S>(filter: &str, format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    layer_with_writer(filter, format, super::stdout::Stdout)
}

/// [`layer`] writing somewhere else than stdout (benchmarks write to a sink).
pub fn layer_with_writer<S, W>(filter: &str, format: LogFormat, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> tfmt::MakeWriter<'w> + Clone + Send + Sync + 'static,
{
    // Settings refuse a filter that does not parse (exit 2); the fallback
    // only serves other callers.
    let filter = EnvFilter::try_new(filter)
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .and(filter_fn(|meta| meta.is_event()));
    match format {
        LogFormat::Json => {
            let interest = Arc::new(AtomicU8::new(UNKNOWN));
            let direct = writer.clone();
            let _ = DIRECT_ACCESS.set(DirectAccess {
                // One `write_all` per line, as the layer writes its lines.
                write: Box::new(move |line| {
                    let _ = direct.make_writer().write_all(line);
                }),
                interest: Arc::clone(&interest),
            });
            tfmt::layer()
                .event_format(JsonLine)
                .with_writer(writer)
                .with_filter(NotingAccess {
                    inner: filter,
                    interest,
                })
                .boxed()
        }
        LogFormat::Text => tfmt::layer()
            .event_format(TextWithTraceIds(tfmt::format()))
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log writer the test reads back.
    #[derive(Clone, Default)]
    struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn timestamps_match_chrono() {
        for secs in [0_u64, 951_782_400, 1_795_982_443, 4_107_542_399, 253_402_300_799] {
            let at = UNIX_EPOCH + Duration::from_micros(secs * 1_000_000 + 934_927);
            let mut ours = String::new();
            write_timestamp(&mut ours, at).expect("write");
            let theirs = chrono::DateTime::<chrono::Utc>::from(at)
                .format("%Y-%m-%dT%H:%M:%S%.6fZ")
                .to_string();
            assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn numbers_and_ids_are_written_as_display_writes_them() {
        for value in [0_u64, 7, 10, 200, 65_535, u64::MAX] {
            let mut ours = String::new();
            write_u64(&mut ours, value).expect("write");
            assert_eq!(ours, value.to_string());
        }
        let trace = opentelemetry::trace::TraceId::from_bytes([
            0, 1, 2, 0xab, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0xff,
        ]);
        let span = opentelemetry::trace::SpanId::from_bytes([0xde, 0xad, 0, 1, 2, 3, 4, 0x0f]);
        let (mut t, mut s) = (String::new(), String::new());
        write_hex(&mut t, &trace.to_bytes()).expect("write");
        write_hex(&mut s, &span.to_bytes()).expect("write");
        assert_eq!((t, s), (trace.to_string(), span.to_string()));
    }

    #[test]
    fn strings_are_escaped_as_json_reads_them() {
        let nasty = "a\"b\\c\nd\re\tf\u{1}g\u{1f}h é 💥";
        let mut out = String::new();
        write_json_str(&mut out, nasty).expect("write");
        let back: String = serde_json::from_str(&out).expect("valid JSON string");
        assert_eq!(back, nasty);
    }

    #[test]
    fn access_lines_written_straight_out_match_the_events() {
        use tracing_subscriber::layer::SubscriberExt;

        let lines = Lines::default();
        let sink = lines.clone();
        let subscriber =
            tracing_subscriber::registry()
                .with(layer_with_writer("info", LogFormat::Json, move || sink.clone()));
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..2 {
                access("GET", "/v1/\"x\"", 200, Duration::from_micros(1234), "r-1");
            }
        });
        assert_eq!(
            DIRECT_ACCESS.get().map(|d| d.interest.load(Ordering::Relaxed)),
            Some(ALWAYS)
        );
        let text = String::from_utf8(lines.0.lock().expect("lock").clone()).expect("utf-8");
        let lines: Vec<serde_json::Map<String, serde_json::Value>> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        let (event, direct) = (&lines[0], &lines[1]);
        let keys = |l: &serde_json::Map<String, serde_json::Value>| l.keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(event), keys(direct), "{text}");
        for (key, value) in event {
            match key.as_str() {
                "timestamp" => assert!(direct[key].is_string()),
                "latency_ms" => {
                    assert!((value.as_f64().unwrap() - 1.234).abs() < 1e-9);
                    assert_eq!(direct[key].as_f64(), Some(1.234));
                }
                _ => assert_eq!(&direct[key], value, "{key}"),
            }
        }
        assert_eq!(direct["route"], "/v1/\"x\"");
    }

    #[test]
    fn a_line_is_one_json_object_with_the_fields_in_order() {
        use tracing_subscriber::layer::SubscriberExt;

        let lines = Lines::default();
        let sink = lines.clone();
        let subscriber = tracing_subscriber::registry().with(
            tfmt::layer()
                .event_format(JsonLine)
                .with_writer(move || sink.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(
                target: "moneta::access",
                method = "GET",
                route = %"/v1/x",
                status = 200_u64,
                latency_ms = 1.5,
                ok = true,
                delta = -3_i64,
                odd = ?"q\"uote",
                "request"
            );
        });
        let text = String::from_utf8(lines.0.lock().expect("lock").clone()).expect("utf-8");
        assert!(text.ends_with('\n') && text.lines().count() == 1, "{text:?}");
        let line: serde_json::Value = serde_json::from_str(text.trim_end()).expect("one JSON object");
        let order = [
            "timestamp",
            "level",
            "message",
            "method",
            "route",
            "status",
            "latency_ms",
            "ok",
            "delta",
            "odd",
            "target",
        ]
        .map(|key| {
            text.find(&format!("\"{key}\":"))
                .unwrap_or_else(|| panic!("{key} in {text}"))
        });
        assert!(order.is_sorted(), "keys out of order: {text}");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["message"], "request");
        assert_eq!(line["status"], 200);
        assert_eq!(line["latency_ms"], 1.5);
        assert_eq!(line["odd"], "\"q\\\"uote\"");
        assert_eq!(line["target"], "moneta::access");
    }
}
