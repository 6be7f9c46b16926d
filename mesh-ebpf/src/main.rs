//! Lacewing's kernel programs, built for `bpfel-unknown-none` and embedded in
//! `lacewing-node`.
//!
//! One module per attach family (Cilium's `bpf_sock.c` shape); `maps` declares
//! every map. Entry points stay a few lines and call plain functions.
#![no_std]
#![no_main]

mod capture;
mod fastpath;
mod inbound;
mod lb;
mod maps;
mod sock_addr;
mod sockaddr;
mod splice;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible: cgroup programs call GPL-only helpers in later issues.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual BSD/GPL\0";
