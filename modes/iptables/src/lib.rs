//! kproxy's iptables mode.
