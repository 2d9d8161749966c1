//! The API's own metrics: request durations by method, matched route
//! template and status code.

use std::time::Duration;

use axum::http::Method;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: &'static str,
    /// A route template such as `/api/users/{id}`, or `unmatched`.
    route: String,
    status_code: u16,
}

/// `http_request_duration_seconds{method,route,status_code}`.
#[derive(Debug, Clone)]
pub struct HttpMetrics {
    durations: Family<HttpLabels, Histogram, fn() -> Histogram>,
}

fn histogram() -> Histogram {
    Histogram::new(polydev_telemetry::metrics::duration_buckets())
}

impl HttpMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let durations = Family::new_with_constructor(histogram as fn() -> Histogram);
        registry.register_with_unit(
            "http_request_duration",
            "HTTP requests by method, route template and status code",
            Unit::Seconds,
            durations.clone(),
        );
        Self { durations }
    }

    /// Records one request (public for the benchmark).
    pub fn observe(&self, method: &Method, route: &str, status: u16, elapsed: Duration) {
        // Methods outside the standard set share one label value, so a
        // client cannot grow the label space.
        let method = match *method {
            Method::GET => "GET",
            Method::POST => "POST",
            Method::PUT => "PUT",
            Method::DELETE => "DELETE",
            Method::PATCH => "PATCH",
            Method::HEAD => "HEAD",
            Method::OPTIONS => "OPTIONS",
            _ => "OTHER",
        };
        self.durations
            .get_or_create(&HttpLabels {
                method,
                route: route.to_owned(),
                status_code: status,
            })
            .observe(elapsed.as_secs_f64());
    }
}
