//! The seccomp filter every sandbox runs under, as a classic BPF program in
//! the byte form `bwrap --seccomp FD` reads.
//!
//! It is a deny list on top of the namespaces and dropped capabilities:
//! calls that reach kernel surface a CLI never needs (module loading,
//! mounts, new namespaces, keyrings, BPF, perf, io_uring, ptrace) answer
//! `EPERM`; `clone3` answers `ENOSYS` so libc falls back to `clone`,
//! whose flags can be checked; a foreign architecture or the x32 ABI ends
//! the process; `socket`/`socketpair` take only the families a CLI uses
//! (Unix, IPv4, IPv6, netlink: not vsock, which network namespaces do not
//! scope, nor packet, Bluetooth, …); `personality` takes only the values a
//! normal program sets (no turning address randomisation off). Everything
//! else is allowed.

const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K

const RET_ALLOW: u32 = 0x7fff_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ERRNO: u32 = 0x0005_0000;

// struct seccomp_data { int nr; u32 arch; u64 ip; u64 args[6]; }
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARG0_LO: u32 = 16;
const OFF_ARG1_LO: u32 = 24;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

/// CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME.
const CLONE_NEW_ANY: u32 = 0x0002_0000
    | 0x0200_0000
    | 0x0400_0000
    | 0x0800_0000
    | 0x1000_0000
    | 0x2000_0000
    | 0x4000_0000
    | 0x0000_0080;
const TIOCSTI: u32 = 0x5412;

/// Socket families a sandbox may open: AF_UNIX, AF_INET, AF_INET6, AF_NETLINK.
const SOCKET_FAMILIES: [u32; 4] = [1, 2, 10, 16];
/// `personality` values allowed (Docker's default profile): PER_LINUX,
/// PER_LINUX32, UNAME26, PER_LINUX32|UNAME26, and the query 0xffffffff.
const PERSONALITIES: [u32; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// System calls answered with `EPERM`.
pub fn denied() -> Vec<(&'static str, i64)> {
    use libc::*;
    let mut v = vec![
        ("mount", SYS_mount),
        ("umount2", SYS_umount2),
        ("pivot_root", SYS_pivot_root),
        ("swapon", SYS_swapon),
        ("swapoff", SYS_swapoff),
        ("reboot", SYS_reboot),
        ("kexec_load", SYS_kexec_load),
        ("kexec_file_load", SYS_kexec_file_load),
        ("init_module", SYS_init_module),
        ("finit_module", SYS_finit_module),
        ("delete_module", SYS_delete_module),
        ("bpf", SYS_bpf),
        ("perf_event_open", SYS_perf_event_open),
        ("userfaultfd", SYS_userfaultfd),
        ("keyctl", SYS_keyctl),
        ("add_key", SYS_add_key),
        ("request_key", SYS_request_key),
        ("acct", SYS_acct),
        ("quotactl", SYS_quotactl),
        ("open_by_handle_at", SYS_open_by_handle_at),
        ("name_to_handle_at", SYS_name_to_handle_at),
        ("ptrace", SYS_ptrace),
        ("process_vm_readv", SYS_process_vm_readv),
        ("process_vm_writev", SYS_process_vm_writev),
        // Another process's descriptors (bwrap's init holds the agent's
        // listening socket).
        ("pidfd_getfd", SYS_pidfd_getfd),
        ("setns", SYS_setns),
        ("unshare", SYS_unshare),
        ("syslog", SYS_syslog),
        ("vhangup", SYS_vhangup),
        ("io_uring_setup", SYS_io_uring_setup),
        ("io_uring_enter", SYS_io_uring_enter),
        ("io_uring_register", SYS_io_uring_register),
        ("open_tree", SYS_open_tree),
        ("move_mount", SYS_move_mount),
        ("fsopen", SYS_fsopen),
        ("fsconfig", SYS_fsconfig),
        ("fsmount", SYS_fsmount),
        ("fspick", SYS_fspick),
        ("mount_setattr", SYS_mount_setattr),
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([("iopl", SYS_iopl), ("ioperm", SYS_ioperm)]);
    v
}

fn stmt(code: u16, k: u32) -> [u8; 8] {
    jump(code, k, 0, 0)
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0..2].copy_from_slice(&code.to_ne_bytes());
    b[2] = jt;
    b[3] = jf;
    b[4..8].copy_from_slice(&k.to_ne_bytes());
    b
}

/// With the accumulator loaded: allow when it equals one of `values`, else
/// answer `otherwise` (`values.len() + 2` instructions).
fn one_of(values: &[u32], otherwise: u32) -> Vec<[u8; 8]> {
    let n = values.len();
    let mut v: Vec<[u8; 8]> = values
        .iter()
        .enumerate()
        .map(|(i, value)| jump(JEQ_K, *value, (n - i) as u8, 0))
        .collect();
    v.extend([stmt(RET_K, otherwise), stmt(RET_K, RET_ALLOW)]);
    v
}

/// The filter as `struct sock_filter` records in native byte order.
pub fn program() -> Vec<u8> {
    let eperm = RET_ERRNO | libc::EPERM as u32;
    let mut p: Vec<[u8; 8]> = vec![
        stmt(LD_W_ABS, OFF_ARCH),
        jump(JEQ_K, AUDIT_ARCH, 1, 0),
        stmt(RET_K, RET_KILL_PROCESS),
        stmt(LD_W_ABS, OFF_NR),
    ];
    #[cfg(target_arch = "x86_64")]
    p.extend([
        jump(JGE_K, 0x4000_0000, 0, 1),
        stmt(RET_K, RET_KILL_PROCESS),
    ]);
    for (_, nr) in denied() {
        p.extend([jump(JEQ_K, nr as u32, 0, 1), stmt(RET_K, eperm)]);
    }
    p.extend([
        jump(JEQ_K, libc::SYS_clone3 as u32, 0, 1),
        stmt(RET_K, RET_ERRNO | libc::ENOSYS as u32),
        // clone: refuse namespace flags (in the low word of the first
        // argument on both architectures).
        jump(JEQ_K, libc::SYS_clone as u32, 0, 4),
        stmt(LD_W_ABS, OFF_ARG0_LO),
        jump(JSET_K, CLONE_NEW_ANY, 0, 1),
        stmt(RET_K, eperm),
        stmt(RET_K, RET_ALLOW),
    ]);
    // socket(family, …) and socketpair(family, …): allowed families only.
    p.extend([
        jump(JEQ_K, libc::SYS_socket as u32, 1, 0),
        jump(
            JEQ_K,
            libc::SYS_socketpair as u32,
            0,
            SOCKET_FAMILIES.len() as u8 + 3,
        ),
        stmt(LD_W_ABS, OFF_ARG0_LO),
    ]);
    p.extend(one_of(&SOCKET_FAMILIES, eperm));
    // personality(persona): the usual values only.
    p.extend([
        jump(
            JEQ_K,
            libc::SYS_personality as u32,
            0,
            PERSONALITIES.len() as u8 + 3,
        ),
        stmt(LD_W_ABS, OFF_ARG0_LO),
    ]);
    p.extend(one_of(&PERSONALITIES, eperm));
    p.extend([
        // ioctl(fd, TIOCSTI, …) would push keystrokes into a terminal.
        jump(JEQ_K, libc::SYS_ioctl as u32, 0, 3),
        stmt(LD_W_ABS, OFF_ARG1_LO),
        jump(JEQ_K, TIOCSTI, 0, 1),
        stmt(RET_K, eperm),
        stmt(RET_K, RET_ALLOW),
    ]);
    p.concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A classic-BPF interpreter for the instructions the filter uses, run
    /// over a `struct seccomp_data`: the filter's decisions, without a kernel.
    fn decide(nr: i64, args: [u64; 6]) -> u32 {
        let mut data = Vec::with_capacity(64);
        data.extend_from_slice(&(nr as i32).to_ne_bytes());
        data.extend_from_slice(&AUDIT_ARCH.to_ne_bytes());
        data.extend_from_slice(&0u64.to_ne_bytes());
        for a in args {
            data.extend_from_slice(&a.to_ne_bytes());
        }
        let prog: Vec<(u16, u8, u8, u32)> = program()
            .chunks(8)
            .map(|c| {
                (
                    u16::from_ne_bytes([c[0], c[1]]),
                    c[2],
                    c[3],
                    u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
                )
            })
            .collect();
        assert!(
            prog.len() < 4096,
            "the kernel caps filters at 4096 instructions"
        );
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let (code, jt, jf, k) = prog[pc];
            pc += 1;
            match code {
                LD_W_ABS => {
                    let o = k as usize;
                    acc = u32::from_ne_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]);
                }
                JEQ_K => pc += usize::from(if acc == k { jt } else { jf }),
                JGE_K => pc += usize::from(if acc >= k { jt } else { jf }),
                JSET_K => pc += usize::from(if acc & k != 0 { jt } else { jf }),
                RET_K => return k,
                other => panic!("instruction {other:#x} is not interpreted"),
            }
        }
    }

    const EPERM: u32 = RET_ERRNO | libc::EPERM as u32;

    #[test]
    fn vsock_and_other_socket_families_are_refused() {
        for family in [1u64, 2, 10, 16] {
            assert_eq!(decide(libc::SYS_socket, [family, 1, 0, 0, 0, 0]), RET_ALLOW);
        }
        // AF_VSOCK (40), AF_PACKET (17), AF_BLUETOOTH (31), AF_ALG (38).
        for family in [40u64, 17, 31, 38] {
            assert_eq!(decide(libc::SYS_socket, [family, 1, 0, 0, 0, 0]), EPERM);
            assert_eq!(decide(libc::SYS_socketpair, [family, 1, 0, 0, 0, 0]), EPERM);
        }
        assert_eq!(decide(libc::SYS_socketpair, [1, 1, 0, 0, 0, 0]), RET_ALLOW);
    }

    #[test]
    fn personality_takes_only_the_usual_values() {
        for p in PERSONALITIES {
            assert_eq!(
                decide(libc::SYS_personality, [u64::from(p), 0, 0, 0, 0, 0]),
                RET_ALLOW
            );
        }
        // ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC.
        for p in [0x0040000u64, 0x0400000] {
            assert_eq!(decide(libc::SYS_personality, [p, 0, 0, 0, 0, 0]), EPERM);
        }
    }

    #[test]
    fn the_rest_of_the_filter_still_decides_as_before() {
        assert_eq!(decide(libc::SYS_mount, [0; 6]), EPERM);
        assert_eq!(
            decide(libc::SYS_clone3, [0; 6]),
            RET_ERRNO | libc::ENOSYS as u32
        );
        assert_eq!(decide(libc::SYS_clone, [0x1000_0000, 0, 0, 0, 0, 0]), EPERM);
        assert_eq!(decide(libc::SYS_clone, [0x11, 0, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(
            decide(libc::SYS_ioctl, [0, u64::from(TIOCSTI), 0, 0, 0, 0]),
            EPERM
        );
        assert_eq!(decide(libc::SYS_ioctl, [0, 0x5401, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(decide(libc::SYS_read, [0; 6]), RET_ALLOW);
        assert_eq!(
            decide(0x4000_0000 | libc::SYS_read, [0; 6]),
            RET_KILL_PROCESS
        );
    }
}
