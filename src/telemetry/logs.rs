//! Logs go to stdout, one JSON object per line (or human text for local work),
//! each carrying the `trace_id` and `span_id` of the span it was written in.

use std::fmt;

use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{FilterExt, filter_fn};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, JsonFields, Writer};
use tracing_subscriber::fmt::{self as tfmt, FmtContext};
use tracing_subscriber::registry::LookupSpan;

use super::traces;
use crate::config::LogFormat;

/// Puts the active trace and span ids in front of what `inner` writes.
struct WithTraceIds<F> {
    inner: F,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
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
        let Some((trace_id, span_id)) = traces::current_ids() else {
            return self.inner.format_event(ctx, writer, event);
        };
        if !self.json {
            write!(writer, "trace_id={trace_id} span_id={span_id} ")?;
            return self.inner.format_event(ctx, writer, event);
        }
        let mut line = String::with_capacity(256);
        self.inner.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(
                writer,
                "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",{rest}"
            ),
            None => writer.write_str(&line),
        }
    }
}

/// The stdout layer, filtered by `RUST_LOG` on its own so that the level of
/// logs never decides which spans are traced. Lines do not list span fields,
/// so the layer skips spans altogether rather than format their fields on
/// every request.
pub(crate) fn layer<S>(filter: &str, format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let filter = EnvFilter::try_new(filter)
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .and(filter_fn(|meta| meta.is_event()));
    match format {
        LogFormat::Json => tfmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(WithTraceIds {
                inner: tfmt::format()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false),
                json: true,
            })
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => tfmt::layer()
            .event_format(WithTraceIds {
                inner: tfmt::format(),
                json: false,
            })
            .with_filter(filter)
            .boxed(),
    }
}
