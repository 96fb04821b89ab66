//! Envoy's response flags: what the proxy did to a request, for access logs and the bounded
//! `response_flags` metric label.

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

/// Envoy's response flags that Weft sets, as a bit set (a bounded label: at most one value per
/// combination of these).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flags(u16);

impl Flags {
    /// No route.
    pub const NR: Flags = Flags(1);
    /// No healthy upstream.
    pub const UH: Flags = Flags(1 << 1);
    /// Upstream connect failure.
    pub const UF: Flags = Flags(1 << 2);
    /// Upstream overflow (a connection-pool limit).
    pub const UO: Flags = Flags(1 << 3);
    /// Upstream request timeout.
    pub const UT: Flags = Flags(1 << 4);
    /// Upstream retry limit exceeded (the answer after the last allowed try).
    pub const URX: Flags = Flags(1 << 5);
    /// Upstream connection termination (reset, closed, protocol error).
    pub const UC: Flags = Flags(1 << 6);
    /// Fault injection: abort.
    pub const FI: Flags = Flags(1 << 7);
    /// Fault injection: delay.
    pub const DI: Flags = Flags(1 << 8);
    /// Downstream connection termination.
    pub const DC: Flags = Flags(1 << 9);
    /// Local rate limited / overload (reserved for rate limits).
    pub const LR: Flags = Flags(1 << 10);
    /// Bad request (Weft's own: refused framing, bad rewrite).
    pub const BR: Flags = Flags(1 << 11);
    /// No config loaded yet (Weft's own).
    pub const NC: Flags = Flags(1 << 12);
    /// Denied by an authorization policy (Envoy's RBAC filter).
    pub const RBAC: Flags = Flags(1 << 13);
    /// Stream idle timeout: the request body stopped arriving (with a 408).
    pub const SI: Flags = Flags(1 << 14);

    const NAMES: [(Flags, &'static str); 15] = [
        (Flags::NR, "NR"),
        (Flags::UH, "UH"),
        (Flags::UF, "UF"),
        (Flags::UO, "UO"),
        (Flags::UT, "UT"),
        (Flags::URX, "URX"),
        (Flags::UC, "UC"),
        (Flags::FI, "FI"),
        (Flags::DI, "DI"),
        (Flags::DC, "DC"),
        (Flags::LR, "LR"),
        (Flags::BR, "BR"),
        (Flags::NC, "NC"),
        (Flags::RBAC, "RBAC"),
        (Flags::SI, "SI"),
    ];

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// The names of the flags set, in a fixed order.
    fn set(self) -> impl Iterator<Item = &'static str> {
        Self::NAMES.iter().filter(move |(f, _)| self.contains(*f)).map(|(_, n)| *n)
    }

    /// `UF,URX` style, `-` when empty (Envoy's access log form).
    pub fn names(self) -> String {
        if self.is_empty() {
            return "-".into();
        }
        self.set().collect::<Vec<_>>().join(",")
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for Flags {
    fn bitor_assign(&mut self, rhs: Flags) {
        self.0 |= rhs.0;
    }
}

impl EncodeLabelValue for Flags {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        for (i, name) in self.set().enumerate() {
            if i > 0 {
                encoder.write_char(',')?;
            }
            encoder.write_str(name)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_name_every_member_in_a_fixed_order() {
        assert_eq!(Flags::default().names(), "-");
        assert_eq!((Flags::URX | Flags::UF).names(), "UF,URX");
        assert_eq!((Flags::DI | Flags::FI).names(), "FI,DI");
    }
}
