//! The state machines of the things polydev runs: a sandbox's status, a
//! run's and each of its providers' state, a login session's state. Each is
//! an enum with its text form (what the store keeps, the API shows and the
//! web UI matches: `snake_case`), its terminal states and the transitions it
//! allows; everything that holds a state holds one of these, never a string.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A state's text was not one of its machine's states.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {machine} state {value:?}")]
pub struct UnknownState {
    pub machine: &'static str,
    pub value: String,
}

macro_rules! states {
    ($(#[$doc:meta])* $name:ident, $machine:literal { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every state, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl FromStr for $name {
            type Err = UnknownState;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(UnknownState {
                        machine: $machine,
                        value: other.chars().take(64).collect(),
                    }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

states!(
    /// A sandbox's record: `creating → pooled → ready`, or `creating →
    /// ready`; from any live status to a final one.
    SandboxStatus, "sandbox" {
        Creating = "creating",
        /// Booted, in a warm pool, nobody's yet.
        Pooled = "pooled",
        Ready = "ready",
        Failed = "failed",
        /// Destroyed on purpose (deleted, expired, its session ended).
        Ended = "ended",
        /// Gone without the controller (found missing by reconciliation).
        Lost = "lost",
    }
);

impl SandboxStatus {
    /// Live statuses hold a sandbox (and count against quotas).
    pub fn is_live(self) -> bool {
        matches!(self, Self::Creating | Self::Pooled | Self::Ready)
    }

    pub fn can_become(self, next: SandboxStatus) -> bool {
        use SandboxStatus::*;
        match (self, next) {
            (Creating, Pooled | Ready) | (Pooled, Ready) => true,
            (from, to) => from.is_live() && !to.is_live(),
        }
    }
}

states!(
    /// One provider's part of a run: `[queued →] awaiting_credentials →
    /// running → done | failed | cancelled` (failed or cancelled also
    /// before running). `queued`: another run of the same user holds that
    /// provider's credential; this one waits its turn.
    ProviderState, "provider" {
        Queued = "queued",
        AwaitingCredentials = "awaiting_credentials",
        Running = "running",
        Done = "done",
        Failed = "failed",
        Cancelled = "cancelled",
    }
);

impl ProviderState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Done | Self::Failed | Self::Cancelled)
    }

    pub fn can_become(self, next: ProviderState) -> bool {
        use ProviderState::*;
        matches!(
            (self, next),
            (Queued, AwaitingCredentials | Failed | Cancelled)
                | (AwaitingCredentials, Running | Failed | Cancelled)
                | (Running, Done | Failed | Cancelled)
        )
    }
}

states!(
    /// A run as a whole: running until every provider ended (`finished`),
    /// or cancelled.
    RunState, "run" {
        Running = "running",
        Finished = "finished",
        Cancelled = "cancelled",
    }
);

states!(
    /// A login session: `booting → ready → awaiting_login | awaiting_code →
    /// completed`; `failed`, `expired` or `cancelled` from any live state.
    LoginState, "login" {
        Booting = "booting",
        Ready = "ready",
        AwaitingLogin = "awaiting_login",
        AwaitingCode = "awaiting_code",
        Completed = "completed",
        Failed = "failed",
        Expired = "expired",
        Cancelled = "cancelled",
    }
);

impl LoginState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Expired | Self::Cancelled
        )
    }

    /// Ended by time or by the user: nothing of it can be used any more
    /// (the API answers 410 Gone).
    pub fn is_gone(self) -> bool {
        matches!(self, Self::Expired | Self::Cancelled)
    }

    pub fn can_become(self, next: LoginState) -> bool {
        use LoginState::*;
        match (self, next) {
            (Booting, Ready) => true,
            (Ready, AwaitingLogin | AwaitingCode) => true,
            (AwaitingLogin | AwaitingCode, Completed) => true,
            (from, Failed | Expired | Cancelled) => !from.is_terminal(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trips<T>(all: &[T])
    where
        T: Copy + fmt::Debug + PartialEq + FromStr<Err = UnknownState> + Serialize + fmt::Display,
    {
        for s in all {
            let text = s.to_string();
            assert_eq!(text.parse::<T>().unwrap(), *s);
            assert_eq!(serde_json::to_value(s).unwrap(), serde_json::json!(text));
        }
        let err = "Nope".parse::<T>().unwrap_err();
        assert_eq!(err.value, "Nope");
    }

    #[test]
    fn every_state_reads_back_from_its_text_and_serialises_as_it() {
        round_trips(SandboxStatus::ALL);
        round_trips(ProviderState::ALL);
        round_trips(RunState::ALL);
        round_trips(LoginState::ALL);
    }

    #[test]
    fn terminal_states_are_never_left() {
        for from in ProviderState::ALL.iter().filter(|s| s.is_terminal()) {
            assert!(
                ProviderState::ALL.iter().all(|to| !from.can_become(*to)),
                "{from}"
            );
        }
        for from in LoginState::ALL.iter().filter(|s| s.is_terminal()) {
            assert!(
                LoginState::ALL.iter().all(|to| !from.can_become(*to)),
                "{from}"
            );
        }
        for from in SandboxStatus::ALL.iter().filter(|s| !s.is_live()) {
            assert!(
                SandboxStatus::ALL.iter().all(|to| !from.can_become(*to)),
                "{from}"
            );
        }
    }

    #[test]
    fn the_machines_move_forward_only() {
        use LoginState as L;
        assert!(L::Booting.can_become(L::Ready) && L::Ready.can_become(L::AwaitingCode));
        assert!(L::AwaitingLogin.can_become(L::Completed) && L::Booting.can_become(L::Expired));
        assert!(!L::Ready.can_become(L::Booting) && !L::Booting.can_become(L::Completed));
        use ProviderState as P;
        assert!(P::AwaitingCredentials.can_become(P::Running) && P::Running.can_become(P::Done));
        assert!(!P::AwaitingCredentials.can_become(P::Done));
        assert!(P::Queued.can_become(P::AwaitingCredentials) && P::Queued.can_become(P::Cancelled));
        assert!(!P::Queued.can_become(P::Running) && !P::AwaitingCredentials.can_become(P::Queued));
        assert!(!P::Running.can_become(P::AwaitingCredentials));
        use SandboxStatus as S;
        assert!(S::Creating.can_become(S::Pooled) && S::Pooled.can_become(S::Ready));
        assert!(S::Ready.can_become(S::Lost));
        assert!(!S::Ready.can_become(S::Pooled) && !S::Ready.can_become(S::Creating));
    }
}
