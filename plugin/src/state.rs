//! The device's state as a VMM saves it (snapshot, migration): versioned,
//! serde, independent of the backend.
//!
//! What the guest's driver did to the device and cannot do again: the
//! features it negotiated, what it wrote to device config, and for each
//! queue where the guest's ring stands and which requests the device held
//! (offered again to the device that takes the state), and for a net device
//! what its driver set through the control queue. The rings' addresses
//! and sizes are the VMM transport's state and come back with the queues
//! it passes to `activate`; they are kept here too, to check.

use crate::net_ctrl::NetControlState;
use crate::shadow::QueuePosition;

/// The version [`DeviceState`] is written with. Version 1 (no net control
/// state) is read too; any other is refused.
pub const STATE_VERSION: u32 = 2;

/// One queue's saved state.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueState {
    /// Queue index.
    pub index: u16,
    /// Ring size the guest chose.
    pub size: u16,
    /// Guest-physical descriptor table, available and used ring.
    pub rings: [u64; 3],
    /// Where the guest's ring stands.
    pub position: QueuePosition,
}

/// A bridged device's state (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// Virtio device type.
    pub device_type: u32,
    /// Features the guest negotiated.
    pub acked_features: u64,
    /// Device config writes of the guest's driver, in order, coalesced per
    /// range.
    pub config_writes: Vec<(u64, Vec<u8>)>,
    /// The activated queues (empty when the device was not active).
    pub queues: Vec<QueueState>,
    /// A net device's control-queue state (version 2; absent in 1).
    #[serde(default)]
    pub net_control: Option<NetControlState>,
}
