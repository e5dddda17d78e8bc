/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Definitions shared by mantlet's eBPF programs (mantlet.c) and mirrored
 * by the Go loader through bpf2go (-type). Change a struct here and run
 * `make generate`: the Go side picks the new layout up from BTF.
 *
 * Byte order: IPv4 addresses are kept in network byte order everywhere,
 * ports in host byte order unless a field says otherwise.
 */
#ifndef MANTLET_H
#define MANTLET_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#ifndef AF_INET
#define AF_INET 2
#endif

/* Ports of the ztunnel's listeners (see DESIGN.md "Ports"). */
#define PORT_OUTBOUND 15001
#define PORT_INBOUND_PLAIN 15006
#define PORT_HBONE 15008

/* Slots of the listeners map. The agent puts the ztunnel's listening
 * sockets there; an empty slot makes the programs drop (fail closed). */
enum slot {
	SLOT_OUTBOUND = 0,
	SLOT_INBOUND_PLAIN = 1,
	SLOT_HBONE = 2,
	SLOT_MAX = 3,
};

/* What an interface of the node is to mantlet. */
enum iface_kind {
	IFACE_POD = 1,    /* host side of an enrolled pod's veth */
	IFACE_UPLINK = 2, /* interface towards other nodes */
};

/* iface_info.flags */
#define IFACE_F_STRICT (1U << 0) /* STRICT mTLS: drop SYNs the ztunnel did not send */

struct iface_info {
	enum iface_kind kind;
	__u32 flags; /* IFACE_F_* */
};

/* Key of pod_ips: a source address a pod may use on its veth. */
struct pod_ip_key {
	__u32 ifindex;
	__u32 addr; /* network byte order */
};

/* Key of the exclusion LPM trie. */
struct lpm_v4_key {
	__u32 prefixlen;
	__u32 addr; /* network byte order */
};

/* config.flags */
#define CFG_F_INBOUND_PLAIN (1U << 0)       /* capture plaintext from other nodes to local pods on ports other than 15008 (slot 1) */
#define CFG_F_INBOUND_PLAIN_LOCAL (1U << 1) /* capture plaintext from this node's unmeshed pods to PERMISSIVE pods (slot 1) */
#define CFG_F_ROUTE_CHECK (1U << 2)         /* the kernel's bpf_fib_lookup takes a mark (Linux 6.10): verify local delivery before steering */

/* The loopback device: same-node plaintext is turned around into its
 * ingress so that policy routing delivers it locally. */
#define LOOPBACK_IFINDEX 1

/* The single entry of the config map. The loader writes it on every Open;
 * route_table and rule_priority are not read by the programs, they are
 * kept here so that cleanup knows what to remove. New fields go at the
 * end: cleanup reads the leading fields of older versions' pins. */
struct settings {
	__u32 redirect_mark; /* fwmark bits set on packets that must be delivered locally */
	__u32 mark_mask;     /* bits of skb->mark owned by redirect_mark */
	__u32 ztunnel_mark;  /* SO_MARK bits carried by the ztunnel's sockets */
	__u32 flags;         /* CFG_F_* */
	__u32 route_table;   /* policy routing table with `local 0.0.0.0/0 dev lo` */
	__u32 rule_priority; /* priority of the fwmark rule */
	__u32 pass_mark;     /* set by pod_ingress on the packets it lets leave untouched; uplink_egress drops pod packets without it */
};

/* The per-CPU counters: the single entry of the counters map. */
struct counter_set {
	__u64 redirected;           /* pod SYNs marked for capture */
	__u64 uplink_redirected;    /* uplink SYNs to local pods marked for capture */
	__u64 assigned;             /* tc: packets assigned to the local socket that owns their flow */
	__u64 assign_failed;        /* tc: bpf_sk_assign refused (dropped) */
	__u64 spoof_drops;          /* pod packets whose source address is not the pod's */
	__u64 strict_drops;         /* SYNs towards a STRICT pod that the ztunnel did not send */
	__u64 no_listener;          /* captured, but the listener slot is empty (dropped) */
	__u64 excluded;             /* pod SYNs left alone because the destination is excluded */
	__u64 lookup_outbound;      /* given to the outbound listener (slot 0) */
	__u64 lookup_inbound_plain; /* given to the inbound plaintext listener (slot 1) */
	__u64 lookup_hbone;         /* given to the HBONE listener (slot 2) */
	__u64 lookup_failed;        /* bpf_sk_assign refused the listener (dropped) */
	__u64 local_plain_redirected; /* pod_egress: plaintext SYNs from unmeshed pods of this node turned to the ztunnel */
	__u64 route_drops;          /* tc: captured SYNs dropped because policy routing would not deliver them locally */
	__u64 leak_drops;           /* uplink_egress: packets of enrolled pods leaving the node unchecked by pod_ingress or the ztunnel */
	__u64 orphan_drops;         /* pod_ingress: later packets of a flow the ztunnel carried whose ztunnel socket is gone (agent restarted or crashed) */
};

#define MAX_IFACES 4096
#define MAX_POD_IPS 8192
#define MAX_LOCAL_PODS 8192
#define MAX_NODE_IPS 64
#define MAX_EXCLUDE_CIDRS 256
#define MAX_EXCLUDE_PORTS 64
#define MAX_TUNNELED_FLOWS 65536

/* All maps are pinned by name under the node's pin directory so that a
 * restarting agent adopts them. */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct settings);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} config SEC(".maps");

/* ifindex -> what the interface is (pods and uplinks). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_IFACES);
	__type(key, __u32);
	__type(value, struct iface_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ifaces SEC(".maps");

/* A TCP flow as a pod sends it: its packets' addresses and ports (network
 * byte order). */
struct flow_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
};

/* Flows of enrolled pods that the ztunnel carries, keyed as the pod sends
 * them: recorded when pod_ingress steers a pod's SYN to the ztunnel and
 * when the ztunnel's SYN reaches a pod (reversed). A later packet of such
 * a flow that no socket owns any more (the ztunnel's end died with the
 * agent) is dropped, never passed in clear. Least recently used entries
 * make room (long-idle flows are the first to go). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_TUNNELED_FLOWS);
	__type(key, struct flow_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tunneled SEC(".maps");

/* (ifindex, address) pairs a pod may send from (anti-spoofing). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_POD_IPS);
	__type(key, struct pod_ip_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pod_ips SEC(".maps");

/* Addresses of this node's enrolled pods, for the uplink program. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_LOCAL_PODS);
	__type(key, __u32);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} local_pods SEC(".maps");

/* The node's own addresses: never captured, and allowed through STRICT
 * (kubelet probes). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_NODE_IPS);
	__type(key, __u32);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} node_ips SEC(".maps");

/* Destination prefixes that are never captured. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_EXCLUDE_CIDRS);
	__type(key, struct lpm_v4_key);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} excl_cidrs SEC(".maps");

/* Destination ports (host byte order) that are never captured. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_EXCLUDE_PORTS);
	__type(key, __u16);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} excl_ports SEC(".maps");

/* The ztunnel's listeners by enum slot. 8-byte values so that user space
 * can read a socket cookie back (to report readiness). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, SLOT_MAX);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u64));
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct counter_set);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} counters SEC(".maps");

/* Per-CPU flag raised by the tc programs around bpf_skc_lookup_tcp: the
 * kernel runs the netns' sk_lookup program from inside that helper, and
 * such a probe must neither count nor steer. Pinned like the others so
 * that programs of one generation always share it. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} probing SEC(".maps");

#endif /* MANTLET_H */
