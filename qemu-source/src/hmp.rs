//! Parsers of human-monitor text: `info registers` and `xp` memory dumps.

use mirror_driver::protocol::{VcpuRegs, MAX_VCPUS};

use crate::error::{clip, parse_error, QemuError};

/// Parses `info registers -a` (or `info registers`): one [`VcpuRegs`] per `CPU#N` block.
pub fn parse_registers(text: &str) -> Result<Vec<VcpuRegs>, QemuError> {
    let mut vcpus: Vec<VcpuRegs> = Vec::new();
    for line in text.lines().take(MAX_VCPUS * 64) {
        let line = line.trim();
        if let Some(index) = line.strip_prefix("CPU#") {
            if vcpus.len() == MAX_VCPUS {
                return Err(parse_error("registers", format!("more than {MAX_VCPUS} vCPUs")));
            }
            let index = index.trim().parse().map_err(|_| parse_error("registers", clip(line)))?;
            vcpus.push(VcpuRegs { index, ..Default::default() });
            continue;
        }
        let Some(v) = vcpus.last_mut() else { continue };
        // Segment lines: "GS =0000 ffff888007a00000 ffffffff 00c00000".
        if let Some((name, rest)) = line.split_once('=') {
            let name = name.trim();
            if matches!(name, "FS" | "GS") {
                let base = rest.split_whitespace().nth(1).and_then(|b| u64::from_str_radix(b, 16).ok());
                let base = base.ok_or_else(|| parse_error("registers", clip(line)))?;
                if name == "FS" {
                    v.fs_base = base;
                } else {
                    v.gs_base = base;
                }
                continue;
            }
        }
        // "R8 =0000..." pads short names before the '='.
        for token in line.replace(" =", "=").split_whitespace() {
            let Some((key, value)) = token.split_once('=') else { continue };
            let Ok(value) = u64::from_str_radix(value, 16) else { continue };
            // Outside long mode QEMU prints the 32-bit names (EAX, EIP, EFL).
            let wide = match key {
                "EAX" | "EBX" | "ECX" | "EDX" | "ESI" | "EDI" | "ESP" | "EBP" | "EIP" => format!("R{}", &key[1..]),
                "EFL" => "RFL".to_string(),
                _ => key.to_string(),
            };
            let gpr = [
                "RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RSP", "RBP", "R8", "R9", "R10", "R11", "R12", "R13", "R14",
                "R15",
            ]
            .iter()
            .position(|&g| g == wide);
            match (wide.as_str(), gpr) {
                (_, Some(i)) => v.gprs[i] = value,
                ("RIP", _) => v.rip = value,
                ("RFL", _) => v.rflags = value,
                ("CR0", _) => v.cr0 = value,
                ("CR2", _) => v.cr2 = value,
                ("CR3", _) => v.cr3 = value,
                ("CR4", _) => v.cr4 = value,
                ("EFER", _) => v.efer = value,
                _ => {}
            }
        }
    }
    if vcpus.is_empty() {
        return Err(parse_error("registers", "no CPU#N block"));
    }
    Ok(vcpus)
}

/// Parses `xp /Ngx ADDR` output (`0000000000001000: 0x0123456789abcdef 0x...`) into bytes.
pub fn parse_xp(text: &str, max_words: usize) -> Result<Vec<u8>, QemuError> {
    let mut bytes = Vec::new();
    for line in text.lines() {
        let Some((_, words)) = line.split_once(':') else { continue };
        for word in words.split_whitespace() {
            if bytes.len() >= max_words * 8 {
                return Ok(bytes);
            }
            let hex = word.strip_prefix("0x").ok_or_else(|| parse_error("memory dump", clip(line)))?;
            let value = u64::from_str_radix(hex, 16).map_err(|_| parse_error("memory dump", clip(line)))?;
            bytes.extend_from_slice(&value.to_le_bytes());
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGS: &str = "CPU#0
RAX=0000000000000000 RBX=0000000000000001 RCX=0000000000000002 RDX=0000000000000003
RSI=0000000000000004 RDI=0000000000000005 RBP=0000000000000006 RSP=ffffc90000013e98
R8 =0000000000000008 R9 =0000000000000009 R10=000000000000000a R11=000000000000000b
R12=000000000000000c R13=000000000000000d R14=000000000000000e R15=000000000000000f
RIP=ffffffff81c0f0ae RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
ES =0000 0000000000000000 ffffffff 00c00000
CS =0010 0000000000000000 ffffffff 00a09b00 DPL=0 CS64 [-RA]
FS =0000 00007f0000001000 ffffffff 00c00000
GS =0000 ffff88800f600000 ffffffff 00c00000
CR0=80050033 CR2=00007ffd5e1f0f28 CR3=000000000a4a2000 CR4=00350ef0
EFER=0000000000000d01
CPU#1
RIP=ffffffff81c0f0ae RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
CR0=80050033 CR2=0000000000000000 CR3=0000000002a0c000 CR4=00350ef0
";

    #[test]
    fn registers_parse_per_cpu() {
        let vcpus = parse_registers(REGS).unwrap();
        assert_eq!(vcpus.len(), 2);
        let v = &vcpus[0];
        assert_eq!((v.index, v.rip, v.rflags), (0, 0xffff_ffff_81c0_f0ae, 0x246));
        assert_eq!(v.gprs[6], 0xffff_c900_0001_3e98, "RSP");
        assert_eq!(v.gprs[15], 0xf, "R15");
        assert_eq!((v.gprs[8], v.gprs[9], v.gprs[10]), (8, 9, 0xa), "R8-R10, whose names QEMU pads");
        assert_eq!((v.cr0, v.cr3, v.cr4, v.efer), (0x8005_0033, 0xa4a_2000, 0x35_0ef0, 0xd01));
        assert_eq!((v.fs_base, v.gs_base), (0x7f00_0000_1000, 0xffff_8880_0f60_0000));
        assert_eq!((vcpus[1].index, vcpus[1].cr3), (1, 0x2a0_c000));
        let real_mode =
            parse_registers("CPU#0\nEAX=00000000 EBX=00000001\nEIP=0000fff0 EFL=00000002 [-------] CPL=0\n").unwrap();
        assert_eq!((real_mode[0].rip, real_mode[0].rflags, real_mode[0].gprs[1]), (0xfff0, 2, 1));
        assert!(parse_registers("nothing here").is_err());
        assert!(parse_registers("CPU#x\n").is_err());
    }

    #[test]
    fn memory_dumps_parse_to_bytes() {
        let text = "0000000000001000: 0x0807060504030201 0x100f0e0d0c0b0a09\n0000000000001010: 0x0000000000000011\n";
        let bytes = parse_xp(text, 64).unwrap();
        assert_eq!(&bytes[..9], &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(bytes.len(), 24);
        assert_eq!(parse_xp(text, 1).unwrap().len(), 8, "bounded");
        assert!(parse_xp("0: zz", 1).is_err());
    }
}
