//! [`MacAddr`]: an Ethernet address, parsed from and printed as
//! `02:ca:57:00:00:02` (config files, log lines).

use std::fmt;
use std::str::FromStr;

/// An Ethernet MAC address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The six bytes.
    pub const fn octets(self) -> [u8; 6] {
        self.0
    }
}

impl From<[u8; 6]> for MacAddr {
    fn from(b: [u8; 6]) -> Self {
        MacAddr(b)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// A string that is not six `:`-separated hex bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("use six hex bytes, 02:ca:57:00:00:02")]
pub struct MacParseError;

impl FromStr for MacAddr {
    type Err = MacParseError;

    /// Parses "02:ca:57:00:00:02" (either case).
    fn from_str(s: &str) -> Result<Self, MacParseError> {
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for b in mac.iter_mut() {
            let part = parts.next().ok_or(MacParseError)?;
            *b = u8::from_str_radix(part, 16).map_err(|_| MacParseError)?;
        }
        if parts.next().is_some() {
            return Err(MacParseError);
        }
        Ok(MacAddr(mac))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        let m: MacAddr = "02:CA:57:00:00:02".parse().unwrap();
        assert_eq!(m, MacAddr([2, 0xca, 0x57, 0, 0, 2]));
        assert_eq!(m.to_string(), "02:ca:57:00:00:02");
        assert_eq!("02:ca:57:00:00".parse::<MacAddr>(), Err(MacParseError));
        assert_eq!(
            "02:ca:57:00:00:02:03".parse::<MacAddr>(),
            Err(MacParseError)
        );
        assert_eq!("02:ca:57:00:00:zz".parse::<MacAddr>(), Err(MacParseError));
    }
}
