//! Minimal hardware-reduced ACPI for a Linux guest, after Firecracker's
//! `src/vmm/src/acpi`: an RSDP at [`layout::RSDP_ADDR`] pointing to an XSDT
//! with a FADT (hardware-reduced, no VGA, no MSI, no ASPM; its DSDT pointer)
//! and a MADT (the in-kernel IOAPIC and one local APIC per vCPU). The DSDT
//! declares COM1 (`PNP0501`, ports 0x3f8-0x3ff, GSI 4) and each virtio-mmio
//! device (`LNRO0005`, its 4 KiB window, its GSI), which is how a kernel
//! without `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` (Debian's) finds them.

use super::{layout, LinuxError};
use crate::memory::GuestMemoryMmap;
use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt, Name, Path, ResourceTemplate,
    Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

const OEM_ID: [u8; 6] = *b"CASTOR";
const OEM_REVISION: u32 = 1;
/// FADT "hypervisor vendor identity".
const HYPERVISOR_VENDOR_ID: u64 = u64::from_le_bytes(*b"CASTORVM");
/// IA-PC boot architecture flags: no VGA, no MSI, no PCIe ASPM control.
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 3) | (1 << 4);

/// A virtio-mmio device to declare: window base, GSI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioDecl {
    /// Base of its 4 KiB window.
    pub base: u64,
    /// Its interrupt line.
    pub gsi: u32,
}

fn serialize(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT's AML body: `\_SB_` with COM1 and the virtio devices.
pub fn dsdt_body(virtio: &[VirtioDecl]) -> Vec<u8> {
    let com_hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0501"));
    let com_uid = Name::new(Path::new("_UID"), &0u8);
    let com_io = IO::new(layout::COM1_PORT, layout::COM1_PORT, 1, 8);
    let com_irq = Interrupt::new(true, true, false, false, layout::COM1_GSI);
    let com_crs_t = ResourceTemplate::new(vec![&com_io, &com_irq]);
    let com_crs = Name::new(Path::new("_CRS"), &com_crs_t);
    let com1 = Device::new(Path::new("COM1"), vec![&com_hid, &com_uid, &com_crs]);

    // Each virtio device's parts live in this vector so the AML tree can borrow them.
    struct Parts {
        name: String,
        hid: Name,
        uid: Name,
        cca: Name,
        mem: AddressSpace<u64>,
        irq: Interrupt,
    }
    let parts: Vec<Parts> = virtio
        .iter()
        .enumerate()
        .map(|(i, d)| Parts {
            name: format!("V{:03X}", i & 0xfff),
            hid: Name::new(Path::new("_HID"), &"LNRO0005"),
            uid: Name::new(Path::new("_UID"), &(i as u32)),
            cca: Name::new(Path::new("_CCA"), &1u8),
            mem: AddressSpace::new_memory(
                AddressSpaceCacheable::NotCacheable,
                true,
                d.base,
                d.base + crate::devices::WINDOW_SIZE - 1,
                None,
            ),
            irq: Interrupt::new(true, true, false, false, d.gsi),
        })
        .collect();
    let crs_templates: Vec<ResourceTemplate> = parts
        .iter()
        .map(|p| ResourceTemplate::new(vec![&p.mem, &p.irq]))
        .collect();
    let crs: Vec<Name> = crs_templates
        .iter()
        .map(|t| Name::new(Path::new("_CRS"), t))
        .collect();
    let devices: Vec<Device> = parts
        .iter()
        .zip(&crs)
        .map(|(p, c)| Device::new(Path::new(&p.name), vec![&p.hid, &p.uid, &p.cca, c]))
        .collect();
    let mut children: Vec<&dyn Aml> = vec![&com1];
    for d in &devices {
        children.push(d);
    }
    serialize(&Scope::new(Path::new("\\_SB_"), children))
}

/// Writes the ACPI tables for `vcpus` vCPUs and the given virtio devices.
/// Returns the RSDP's address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    vcpus: u32,
    virtio: &[VirtioDecl],
) -> Result<u64, LinuxError> {
    let mut cursor = layout::RSDP_ADDR + 0x40;
    let mut put = |bytes: &[u8], what: &'static str| -> Result<u64, LinuxError> {
        let addr = cursor;
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| LinuxError::GuestWrite { what, source })?;
        cursor = (addr + bytes.len() as u64 + 15) & !15;
        Ok(addr)
    };

    let body = dsdt_body(virtio);
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"CSTRDSDT", OEM_REVISION);
    dsdt.append_slice(&body);
    let dsdt_addr = put(dsdt.as_slice(), "ACPI DSDT")?;

    let mut fadt = FADTBuilder::new(OEM_ID, *b"CSTRFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.hypervisor_vendor_identity = HYPERVISOR_VENDOR_ID.into();
    let fadt_addr = put(&serialize(&fadt.finalize()), "ACPI FADT")?;

    let mut madt = MADT::new(
        OEM_ID,
        *b"CSTRAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(layout::APIC_ADDR),
    );
    madt.add_structure(IoApic::new(0, layout::IOAPIC_ADDR, 0));
    for id in 0..vcpus.min(255) as u8 {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    let madt_addr = put(&serialize(&madt), "ACPI MADT")?;

    let mut xsdt = XSDT::new(OEM_ID, *b"CSTRXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = put(&serialize(&xsdt), "ACPI XSDT")?;

    if cursor > layout::BIOS_END {
        return Err(LinuxError::TooManyDevices {
            devices: virtio.len(),
            max: crate::devices::MAX_DEVICES,
        });
    }
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    mem.write_slice(&serialize(&rsdp), GuestAddress(layout::RSDP_ADDR))
        .map_err(|source| LinuxError::GuestWrite {
            what: "ACPI RSDP",
            source,
        })?;
    Ok(layout::RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    fn table_at(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut b = vec![0u8; len as usize];
        mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem = crate::memory::create(256 << 20).unwrap();
        let virtio = [VirtioDecl {
            base: 0x8_0000_1000,
            gsi: 5,
        }];
        let rsdp_addr = write_tables(&mem, 2, &virtio).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(rsdp_addr)).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(&rsdp));
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = table_at(&mem, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let entries: Vec<u64> = xsdt[36..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(entries.len(), 2);
        let fadt = table_at(&mem, entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        assert!(checksum_ok(&fadt));
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
        let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table_at(&mem, x_dsdt);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        let body = &dsdt[36..];
        let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"LNRO0005") && has(b"COM1") && has(b"V000"));
        let madt = table_at(&mem, entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        assert!(checksum_ok(&madt));
        // IOAPIC (12 bytes) + two local APICs (8 bytes each).
        assert_eq!(madt.len(), 44 + 12 + 16);
    }
}
