//! A minimal ELF64 loader for the built-in guest: copies each `PT_LOAD`
//! segment to its physical address and returns the entry point.

use crate::error::{Error, Result};
use crate::memory::GuestMemoryMmap;
use castor_guest_abi::layout;
use vm_memory::{Bytes, GuestAddress};

const PT_LOAD: u32 = 1;

fn u16_at(b: &[u8], off: usize) -> Result<u16> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| Error::Image(format!("truncated at offset {off}")))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| Error::Image(format!("truncated at offset {off}")))
}

fn u64_at(b: &[u8], off: usize) -> Result<u64> {
    let s = b
        .get(off..off + 8)
        .ok_or_else(|| Error::Image(format!("truncated at offset {off}")))?;
    let mut w = [0u8; 8];
    w.copy_from_slice(s);
    Ok(u64::from_le_bytes(w))
}

/// Loads `elf` into `mem`; every segment must lie inside the image area of the
/// guest layout. Returns the entry point.
pub fn load_elf(mem: &GuestMemoryMmap, elf: &[u8]) -> Result<u64> {
    if elf.get(0..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err(Error::Image("not a little-endian ELF64 file".into()));
    }
    let entry = u64_at(elf, 24)?;
    let phoff = u64_at(elf, 32)? as usize;
    let phentsize = u16_at(elf, 54)? as usize;
    let phnum = u16_at(elf, 56)? as usize;
    let area = layout::IMAGE_ADDR..layout::IMAGE_ADDR + layout::IMAGE_MAX;
    let mut loaded = 0;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(elf, ph)? != PT_LOAD {
            continue;
        }
        let offset = u64_at(elf, ph + 8)? as usize;
        let paddr = u64_at(elf, ph + 24)?;
        let filesz = u64_at(elf, ph + 32)? as usize;
        let memsz = u64_at(elf, ph + 40)?;
        let end = paddr
            .checked_add(memsz)
            .ok_or_else(|| Error::Image("segment wraps".into()))?;
        if !area.contains(&paddr) || end > area.end || (filesz as u64) > memsz {
            return Err(Error::Image(format!(
                "segment at {paddr:#x}+{memsz:#x} is outside the image area {:#x}..{:#x}",
                area.start, area.end
            )));
        }
        let data = elf
            .get(offset..offset + filesz)
            .ok_or_else(|| Error::Image("segment data beyond the file".into()))?;
        mem.write_slice(data, GuestAddress(paddr))
            .map_err(|e| Error::Memory(format!("loading segment at {paddr:#x}: {e}")))?;
        let zeros = vec![0u8; (memsz as usize) - filesz];
        mem.write_slice(&zeros, GuestAddress(paddr + filesz as u64))
            .map_err(|e| Error::Memory(format!("zeroing segment tail at {paddr:#x}: {e}")))?;
        loaded += 1;
    }
    if loaded == 0 || !area.contains(&entry) {
        return Err(Error::Image(
            "no loadable segment or entry outside the image".into(),
        ));
    }
    Ok(entry)
}
