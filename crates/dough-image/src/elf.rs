//! Just enough ELF to tell whether a binary is static and whether a kernel
//! file is an uncompressed vmlinux.

/// `true` if `bytes` is a 64-bit little-endian ELF.
pub fn is_elf64(bytes: &[u8]) -> bool {
    bytes.len() >= 64 && &bytes[..4] == b"\x7fELF" && bytes[4] == 2 && bytes[5] == 1
}

/// `true` if the ELF has a PT_INTERP program header (needs a dynamic loader).
pub fn has_interpreter(bytes: &[u8]) -> Option<bool> {
    if !is_elf64(bytes) {
        return None;
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let phoff = u64::from_le_bytes(bytes[32..40].try_into().ok()?) as usize;
    let phentsize = u16_at(54) as usize;
    let phnum = u16_at(56) as usize;
    for i in 0..phnum {
        let o = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let p_type = bytes.get(o..o + 4)?;
        if u32::from_le_bytes(p_type.try_into().ok()?) == 3 {
            return Some(true);
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_binary_itself_is_dynamic() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(is_elf64(&me));
        assert_eq!(has_interpreter(&me), Some(true));
        assert_eq!(has_interpreter(b"#!/bin/sh\n"), None);
    }
}
