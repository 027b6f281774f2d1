//! `METRICS`: a per-CPU array of packet counters indexed by `Counter`.

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Packets from pods seen by from_container.
    FromContainer = 0,
    /// Packets to pods seen by to_container.
    ToContainer = 1,
    /// Packets translated to a service backend.
    ServiceDnat = 2,
    /// Replies translated back to the service frontend.
    ReverseNat = 3,
    /// New connections to a service with no backends (dropped).
    DropNoBackend = 4,
    /// Packets that could not be parsed or rewritten.
    DropInvalid = 5,
    /// CT entries that could not be created (map full).
    DropCtFull = 6,
}

pub const COUNTER_MAX: u32 = 8;

impl Counter {
    pub const ALL: [Counter; 7] = [
        Counter::FromContainer,
        Counter::ToContainer,
        Counter::ServiceDnat,
        Counter::ReverseNat,
        Counter::DropNoBackend,
        Counter::DropInvalid,
        Counter::DropCtFull,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::FromContainer => "from_container",
            Counter::ToContainer => "to_container",
            Counter::ServiceDnat => "service_dnat",
            Counter::ReverseNat => "reverse_nat",
            Counter::DropNoBackend => "drop_no_backend",
            Counter::DropInvalid => "drop_invalid",
            Counter::DropCtFull => "drop_ct_full",
        }
    }
}
