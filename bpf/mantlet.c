// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)

//go:build ignore

/*
 * mantlet's data path: capture of pod traffic into the node's ztunnel.
 *
 *   pod_ingress     tc ingress, host side of an enrolled pod's veth
 *   uplink_ingress  tc ingress, the node's uplink interface(s)
 *   uplink_egress   tc egress, the node's uplink interface(s): the last
 *                   guard, drops enrolled pods' packets that no mantlet
 *                   program checked (a detached pod_ingress)
 *   pod_egress      tc egress, host side of an enrolled pod's veth (STRICT;
 *                   PERMISSIVE: same-node plaintext to the ztunnel)
 *   node_sk_lookup  sk_lookup, attached to the node's network namespace
 *
 * Fail closed: a new connection captured by tc is steered to a listener
 * of the ztunnel by tc itself (bpf_sk_assign from the SOCKMAP), and only
 * after bpf_fib_lookup has confirmed that policy routing will deliver it
 * locally; anything that cannot be steered is dropped and counted. A
 * packet that carries a socket is never forwarded by the kernel either,
 * so no single piece of routing state turns capture into pass-through.
 *
 * IPv4 only for now: IPv6 packets pass untouched (not captured).
 * See docs/datapath.md for the whole recipe.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "mantlet.h"

char _license[] SEC("license") = "Dual BSD/GPL";

/* The fields of a packet the programs look at. */
struct pkt {
	__u32 saddr; /* network byte order */
	__u32 daddr; /* network byte order */
	__u16 sport; /* network byte order */
	__u16 dport; /* network byte order */
	__u8 tcp;    /* 1: TCP header parsed */
	__u8 syn;    /* TCP SYN without ACK: a new connection attempt */
};

static __always_inline struct counter_set *get_counters(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&counters, &zero);
}

/* COUNT adds one to a field of this CPU's counter_set. */
#define COUNT(field)                                         \
	do {                                                 \
		struct counter_set *__c = get_counters();    \
		if (__c)                                     \
			__c->field++;                        \
	} while (0)

static __always_inline struct settings *get_config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&config, &zero);
}

/* parse fills p from an Ethernet frame carrying IPv4. It returns -1 for
 * anything else (other protocols, IPv6, frames too short to be IPv4). */
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	struct iphdr ip;
	struct tcphdr tcp;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return -1;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return -1;
	if (ip.version != 4 || ip.ihl < 5)
		return -1;
	p->saddr = ip.saddr;
	p->daddr = ip.daddr;
	p->sport = 0;
	p->dport = 0;
	p->tcp = 0;
	p->syn = 0;
	/* Only the first fragment carries the TCP header. */
	if (ip.protocol != IPPROTO_TCP || (ip.frag_off & bpf_htons(0x1fff)))
		return 0;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + ip.ihl * 4, &tcp, sizeof(tcp)) < 0)
		return 0;
	p->sport = tcp.source;
	p->dport = tcp.dest;
	p->tcp = 1;
	p->syn = tcp.syn && !tcp.ack;
	return 0;
}

static __always_inline __u32 redirect_mark(const struct __sk_buff *skb, const struct settings *cfg)
{
	return (skb->mark & ~cfg->mark_mask) | cfg->redirect_mark;
}

static __always_inline void set_mark(struct __sk_buff *skb, const struct settings *cfg)
{
	skb->mark = redirect_mark(skb, cfg);
}

/* pass lets a packet of an enrolled pod go its way uncaptured, stamped so
 * that uplink_egress knows pod_ingress saw it. */
static __always_inline int pass(struct __sk_buff *skb, const struct settings *cfg)
{
	skb->mark |= cfg->pass_mark;
	return TC_ACT_UNSPEC;
}

/* struct bpf_fib_lookup as Linux 6.10 defines it: the input field mark
 * (policy routing, with BPF_FIB_LOOKUP_MARK) shares its bytes with the
 * output smac. The headers this builds with are older. */
struct fib_query {
	__u8 family;
	__u8 l4_protocol;
	__be16 sport;
	__be16 dport;
	__u16 tot_len;
	__u32 ifindex;
	__u32 tos;
	__be32 ipv4_src;
	__u32 src_pad[3];
	__be32 ipv4_dst;
	__u32 dst_pad[3];
	__u32 tbid;
	__u32 mark;
	__u8 mac_pad[8];
};
_Static_assert(sizeof(struct fib_query) == sizeof(struct bpf_fib_lookup), "fib_query must match struct bpf_fib_lookup");

#define FIB_LOOKUP_MARK (1U << 5)

/* delivered_locally reports whether policy routing would deliver the
 * packet p, arriving on ifindex with the redirect mark, to this host
 * rather than forward it: the fwmark rule and the local route of the
 * capture table are both in place. A lookup that finds no route at all
 * also counts as local: such a packet cannot leave either. Without
 * CFG_F_ROUTE_CHECK (kernels before 6.10) it trusts the socket
 * assignment, which the kernel never forwards. */
static __always_inline int delivered_locally(const struct __sk_buff *skb, const struct pkt *p,
					     const struct settings *cfg, __u32 ifindex)
{
	struct fib_query q = {};
	long rc;

	if (!(cfg->flags & CFG_F_ROUTE_CHECK))
		return 1;
	q.family = AF_INET;
	q.l4_protocol = IPPROTO_TCP;
	q.sport = p->sport;
	q.dport = p->dport;
	q.ifindex = ifindex;
	q.ipv4_src = p->saddr;
	q.ipv4_dst = p->daddr;
	q.mark = redirect_mark(skb, cfg);
	rc = bpf_fib_lookup((void *)skb, (struct bpf_fib_lookup *)&q, sizeof(q),
			    FIB_LOOKUP_MARK | BPF_FIB_LOOKUP_SKIP_NEIGH);
	return rc == BPF_FIB_LKUP_RET_NOT_FWDED;
}

/* excluded reports whether a new connection to daddr:dport (network byte
 * order) stays out of the mesh: the node's own addresses, configured
 * prefixes and ports. */
static __always_inline int excluded(__u32 daddr, __u16 dport_host)
{
	struct lpm_v4_key k = { .prefixlen = 32, .addr = daddr };

	if (bpf_map_lookup_elem(&node_ips, &daddr))
		return 1;
	if (bpf_map_lookup_elem(&excl_cidrs, &k))
		return 1;
	if (bpf_map_lookup_elem(&excl_ports, &dport_host))
		return 1;
	return 0;
}

/* remember_tunneled records that the ztunnel carries the flow a pod sends
 * as (saddr, daddr, sport, dport). */
static __always_inline void remember_tunneled(__u32 saddr, __u32 daddr, __u16 sport, __u16 dport)
{
	struct flow_key k = { .saddr = saddr, .daddr = daddr, .sport = sport, .dport = dport };
	__u8 one = 1;

	bpf_map_update_elem(&tunneled, &k, &one, BPF_ANY);
}

/* tunneled_flow reports whether the ztunnel carried the pod's flow of p. */
static __always_inline int tunneled_flow(const struct pkt *p)
{
	struct flow_key k = { .saddr = p->saddr, .daddr = p->daddr, .sport = p->sport, .dport = p->dport };

	return bpf_map_lookup_elem(&tunneled, &k) != NULL;
}

static __always_inline void set_probing(__u32 on)
{
	__u32 zero = 0;
	__u32 *v = bpf_map_lookup_elem(&probing, &zero);

	if (v)
		*v = on;
}

/* flow_owner returns a referenced local socket other than a listener that
 * owns the packet's flow (established, half-open or TIME_WAIT), or NULL.
 * The caller releases what it gets; a listener found is released here. */
static __always_inline struct bpf_sock *flow_owner(struct __sk_buff *skb, const struct pkt *p)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;

	t.ipv4.saddr = p->saddr;
	t.ipv4.daddr = p->daddr;
	t.ipv4.sport = p->sport;
	t.ipv4.dport = p->dport;

	set_probing(1);
	sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	set_probing(0);
	if (sk && sk->state == BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return NULL;
	}
	return sk;
}

/* owned reports whether a local socket other than a listener owns the
 * packet's flow. Every reference taken is released. */
static __always_inline int owned(struct __sk_buff *skb, const struct pkt *p)
{
	struct bpf_sock *sk = flow_owner(skb, p);

	if (!sk)
		return 0;
	bpf_sk_release(sk);
	return 1;
}

/* Verdicts of assign_owner. */
enum owner {
	OWNER_NONE = 0,     /* no local socket owns the flow */
	OWNER_ASSIGNED = 1, /* assigned and marked: let it go */
	OWNER_DROP = 2,     /* a socket owns it but it cannot reach it: drop */
};

/* assign_owner looks for a local, non-listening socket that owns the
 * packet's flow (for example the ztunnel's accepted or transparent
 * sockets). If there is one, the packet is assigned to it and marked for
 * local delivery (the kernel never forwards a packet that carries a
 * socket). A TIME_WAIT socket hands a new SYN over to the listener
 * lookup, so sk_lookup still chooses the listener; such a SYN is checked
 * for local delivery like any captured SYN. Every reference taken is
 * released. */
static __always_inline enum owner assign_owner(struct __sk_buff *skb, const struct pkt *p,
					       const struct settings *cfg)
{
	struct bpf_sock *sk = flow_owner(skb, p);
	long err;

	if (!sk)
		return OWNER_NONE;
	if (p->syn && !delivered_locally(skb, p, cfg, skb->ifindex)) {
		bpf_sk_release(sk);
		COUNT(route_drops);
		return OWNER_DROP;
	}
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		COUNT(assign_failed);
		return OWNER_DROP;
	}
	set_mark(skb, cfg);
	COUNT(assigned);
	return OWNER_ASSIGNED;
}

/* Connection tracking, for flows whose destination netfilter rewrites
 * after tc (kube-proxy's DNAT of a Service's virtual IP to an endpoint):
 * the ztunnel's socket of such a flow is keyed by the endpoint, while the
 * pod's later packets still name the virtual IP when tc sees them. The
 * kfunc is weak: without connection tracking in the kernel nothing is
 * rewritten either, and the lookup is skipped. Only the fields read are
 * declared; CO-RE finds them in the kernel's struct nf_conn. */
/* struct bpf_ct_opts as Linux 6.0 defines it (12 bytes; later kernels
 * accept this size too). */
struct bpf_ct_opts {
	__s32 netns_id;
	__s32 error;
	__u8 l4proto;
	__u8 dir;
	__u8 reserved[2];
};

/* As libbpf 1.2's bpf_ksym_exists (Debian's libbpf is older). */
#define ksym_exists(sym)                                                                       \
	({                                                                                     \
		_Static_assert(!__builtin_constant_p(!!sym), #sym " should be marked as __weak"); \
		!!sym;                                                                         \
	})

union nf_inet_addr___m {
	__u32 all[4];
	__be32 ip;
} __attribute__((preserve_access_index));

union nf_conntrack_man_proto___m {
	__be16 all;
	struct {
		__be16 port;
	} tcp;
} __attribute__((preserve_access_index));

struct nf_conntrack_man___m {
	union nf_inet_addr___m u3;
	union nf_conntrack_man_proto___m u;
} __attribute__((preserve_access_index));

struct nf_conntrack_tuple___m {
	struct nf_conntrack_man___m src;
} __attribute__((preserve_access_index));

struct nf_conntrack_tuple_hash___m {
	struct nf_conntrack_tuple___m tuple;
} __attribute__((preserve_access_index));

struct nf_conn___m {
	struct nf_conntrack_tuple_hash___m tuplehash[2];
} __attribute__((preserve_access_index));

extern struct nf_conn___m *bpf_skb_ct_lookup(struct __sk_buff *skb, struct bpf_sock_tuple *tuple, __u32 tuple__sz,
					     struct bpf_ct_opts *opts, __u32 opts__sz) __ksym __weak;
extern void bpf_ct_release(struct nf_conn___m *ct) __ksym __weak;

#define CT_DIR_REPLY 1

/* nat_dest rewrites p's destination to where connection tracking sends
 * the flow (the reply direction's source) and returns 1 if that differs
 * from the destination the packet names; 0 without a tracked flow or a
 * rewrite. */
static __always_inline int nat_dest(struct __sk_buff *skb, struct pkt *p)
{
	struct bpf_ct_opts opts = { .netns_id = -1, .l4proto = IPPROTO_TCP };
	struct bpf_sock_tuple t = {};
	struct nf_conn___m *ct;
	__u32 daddr;
	__u16 dport;

	if (!ksym_exists(bpf_skb_ct_lookup))
		return 0;
	t.ipv4.saddr = p->saddr;
	t.ipv4.daddr = p->daddr;
	t.ipv4.sport = p->sport;
	t.ipv4.dport = p->dport;
	ct = bpf_skb_ct_lookup(skb, &t, sizeof(t.ipv4), &opts, sizeof(opts));
	if (!ct)
		return 0;
	daddr = ct->tuplehash[CT_DIR_REPLY].tuple.src.u3.ip;
	dport = ct->tuplehash[CT_DIR_REPLY].tuple.src.u.tcp.port;
	bpf_ct_release(ct);
	if (daddr == p->daddr && dport == p->dport)
		return 0;
	p->daddr = daddr;
	p->dport = dport;
	return 1;
}

/* assign_nat_owner is assign_owner for a later packet of a flow whose
 * destination connection tracking rewrites: the socket that owns the
 * flow is looked up by the rewritten destination. */
static __always_inline enum owner assign_nat_owner(struct __sk_buff *skb, const struct pkt *p,
						   const struct settings *cfg)
{
	struct pkt q = *p;

	if (!nat_dest(skb, &q))
		return OWNER_NONE;
	return assign_owner(skb, &q, cfg);
}

/* steer hands a new connection (a SYN nobody owns) to the ztunnel's
 * listener in slot, from tc: the listener must be there and policy
 * routing must deliver the packet locally, or it is dropped and counted.
 * sk_lookup is not needed on this path (a packet that carries a socket
 * skips the socket lookup). */
static __always_inline int steer(struct __sk_buff *skb, const struct pkt *p,
				 const struct settings *cfg, __u32 slot)
{
	struct bpf_sock *sk;
	long err;

	sk = bpf_map_lookup_elem(&listeners, &slot);
	if (!sk) {
		COUNT(no_listener);
		return TC_ACT_SHOT;
	}
	if (!delivered_locally(skb, p, cfg, skb->ifindex)) {
		bpf_sk_release(sk);
		COUNT(route_drops);
		return TC_ACT_SHOT;
	}
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		COUNT(lookup_failed);
		return TC_ACT_SHOT;
	}
	set_mark(skb, cfg);
	if (slot == SLOT_OUTBOUND)
		COUNT(lookup_outbound);
	else if (slot == SLOT_HBONE)
		COUNT(lookup_hbone);
	else
		COUNT(lookup_inbound_plain);
	return TC_ACT_UNSPEC;
}

/* pod_ingress sees packets FROM an enrolled pod. */
SEC("tc")
int pod_ingress(struct __sk_buff *skb)
{
	struct pod_ip_key key = {};
	struct settings *cfg;
	struct pkt p;
	int ret;

	if (parse(skb, &p) < 0)
		return TC_ACT_UNSPEC;

	/* Anti-spoofing: the workload identity is bound to the veth, so the
	 * source address must be one of this pod's. */
	key.ifindex = skb->ifindex;
	key.addr = p.saddr;
	if (!bpf_map_lookup_elem(&pod_ips, &key)) {
		COUNT(spoof_drops);
		return TC_ACT_SHOT;
	}
	cfg = get_config();
	if (!cfg)
		return TC_ACT_SHOT;
	/* UDP, ICMP, and TCP fragments without a header: not captured. */
	if (!p.tcp)
		return pass(skb, cfg);

	switch (assign_owner(skb, &p, cfg)) {
	case OWNER_ASSIGNED:
		return TC_ACT_UNSPEC;
	case OWNER_DROP:
		return TC_ACT_SHOT;
	default:
		break;
	}
	if (!p.syn) {
		/* A flow to a Service's virtual IP that the ztunnel accepted
		 * after kube-proxy's DNAT. */
		switch (assign_nat_owner(skb, &p, cfg)) {
		case OWNER_ASSIGNED:
			return TC_ACT_UNSPEC;
		case OWNER_DROP:
			return TC_ACT_SHOT;
		default:
			break;
		}
		/* The ztunnel carried this flow and its end is gone: passing
		 * the rest would send it in clear. */
		if (tunneled_flow(&p)) {
			COUNT(orphan_drops);
			return TC_ACT_SHOT;
		}
		return pass(skb, cfg);
	}
	if (excluded(p.daddr, bpf_ntohs(p.dport))) {
		COUNT(excluded);
		return pass(skb, cfg);
	}
	COUNT(redirected);
	ret = steer(skb, &p, cfg, SLOT_OUTBOUND);
	if (ret == TC_ACT_UNSPEC)
		remember_tunneled(p.saddr, p.daddr, p.sport, p.dport);
	return ret;
}

/* uplink_ingress sees packets arriving from other nodes. */
SEC("tc")
int uplink_ingress(struct __sk_buff *skb)
{
	struct settings *cfg;
	struct pkt p;
	__u32 slot;

	if (parse(skb, &p) < 0 || !p.tcp)
		return TC_ACT_UNSPEC;
	if (!bpf_map_lookup_elem(&local_pods, &p.daddr))
		return TC_ACT_UNSPEC;
	cfg = get_config();
	if (!cfg)
		return TC_ACT_SHOT;

	/* Later packets of HBONE connections, and replies to the ztunnel's
	 * transparent sockets bound to a local pod's address. */
	switch (assign_owner(skb, &p, cfg)) {
	case OWNER_ASSIGNED:
		return TC_ACT_UNSPEC;
	case OWNER_DROP:
		return TC_ACT_SHOT;
	default:
		break;
	}
	if (!p.syn)
		return TC_ACT_UNSPEC;
	if (p.dport == bpf_htons(PORT_HBONE))
		slot = SLOT_HBONE;
	else if (cfg->flags & CFG_F_INBOUND_PLAIN)
		slot = SLOT_INBOUND_PLAIN;
	else
		return TC_ACT_UNSPEC;
	COUNT(uplink_redirected);
	return steer(skb, &p, cfg, slot);
}

/* uplink_egress sees packets leaving the node towards other nodes. An
 * enrolled pod's IPv4 packets leave only as the ztunnel's (its SO_MARK) or
 * after pod_ingress let them pass (the pass mark): one without either
 * escaped a detached or bypassed pod_ingress, and could carry the pod's
 * traffic in plaintext. */
SEC("tc")
int uplink_egress(struct __sk_buff *skb)
{
	struct settings *cfg;
	struct pkt p;

	if (parse(skb, &p) < 0)
		return TC_ACT_UNSPEC;
	if (!bpf_map_lookup_elem(&local_pods, &p.saddr))
		return TC_ACT_UNSPEC;
	cfg = get_config();
	if (!cfg)
		return TC_ACT_SHOT;
	if (cfg->ztunnel_mark && (skb->mark & cfg->ztunnel_mark) == cfg->ztunnel_mark)
		return TC_ACT_UNSPEC;
	if (cfg->pass_mark && (skb->mark & cfg->pass_mark) == cfg->pass_mark)
		return TC_ACT_UNSPEC;
	COUNT(leak_drops);
	return TC_ACT_SHOT;
}

/* pod_egress sees packets TO an enrolled pod. With STRICT it drops new
 * connection attempts that the ztunnel did not make. With PERMISSIVE (and
 * CFG_F_INBOUND_PLAIN_LOCAL) it turns plaintext from unmeshed pods of this
 * node around to the ztunnel's inbound plaintext listener: such packets
 * were forwarded here without passing any mantlet program, so the SYN (and
 * every later packet of a flow the ztunnel accepted) is re-injected at the
 * ingress of lo with the redirect mark; policy routing delivers it
 * locally, sk_lookup assigns slot 1 to the SYN, and the established
 * lookup finds the accepted socket for the rest. */
SEC("tc")
int pod_egress(struct __sk_buff *skb)
{
	static const __u8 lo_mac[ETH_ALEN] = {};
	__u32 ifindex = skb->ifindex;
	struct iface_info *info;
	struct settings *cfg;
	struct pkt p;

	info = bpf_map_lookup_elem(&ifaces, &ifindex);
	if (!info)
		return TC_ACT_UNSPEC;
	if (parse(skb, &p) < 0 || !p.tcp)
		return TC_ACT_UNSPEC;
	cfg = get_config();
	if (cfg && cfg->ztunnel_mark && (skb->mark & cfg->ztunnel_mark) == cfg->ztunnel_mark) {
		/* The ztunnel delivers a flow to the pod: the pod's replies
		 * are tunneled too. */
		if (p.syn)
			remember_tunneled(p.daddr, p.saddr, p.dport, p.sport);
		return TC_ACT_UNSPEC;
	}
	/* Kubelet probes come from the node's own addresses. */
	if (bpf_map_lookup_elem(&node_ips, &p.saddr))
		return TC_ACT_UNSPEC;
	if (info->flags & IFACE_F_STRICT) {
		if (!p.syn)
			return TC_ACT_UNSPEC;
		COUNT(strict_drops);
		return TC_ACT_SHOT;
	}
	if (!cfg || !(cfg->flags & CFG_F_INBOUND_PLAIN_LOCAL))
		return TC_ACT_UNSPEC;
	/* Enrolled pods of this node: their own program already decided. */
	if (bpf_map_lookup_elem(&local_pods, &p.saddr))
		return TC_ACT_UNSPEC;
	if (!p.syn && !owned(skb, &p))
		return TC_ACT_UNSPEC;
	/* Policy routing must deliver it from lo's ingress to the ztunnel;
	 * otherwise it would come back here, forwarded. */
	if (!delivered_locally(skb, &p, cfg, LOOPBACK_IFINDEX)) {
		COUNT(route_drops);
		return TC_ACT_SHOT;
	}
	/* lo's address is all zeroes: the frame must be addressed to it or
	 * the stack drops it as another host's. */
	if (bpf_skb_store_bytes(skb, 0, lo_mac, ETH_ALEN, 0) < 0)
		return TC_ACT_UNSPEC;
	set_mark(skb, cfg);
	if (p.syn)
		COUNT(local_plain_redirected);
	return bpf_redirect(LOOPBACK_IFINDEX, BPF_F_INGRESS);
}

/* node_sk_lookup picks the ztunnel listener for connections that the tc
 * programs marked for local delivery without a socket: SYNs that reuse
 * the tuple of a TIME_WAIT socket (the kernel looks the listener up after
 * the TIME_WAIT socket let the SYN go), and plaintext that pod_egress
 * turned around into lo. New connections from pods and uplinks carry
 * their listener from tc already and never get here. */
SEC("sk_lookup")
int node_sk_lookup(struct bpf_sk_lookup *ctx)
{
	__u32 ifindex = ctx->ingress_ifindex;
	__u32 laddr = ctx->local_ip4;
	__u32 zero = 0, slot;
	struct iface_info *info;
	struct settings *cfg;
	struct bpf_sock *sk;
	__u32 *probe;
	long err;

	probe = bpf_map_lookup_elem(&probing, &zero);
	if (probe && *probe)
		return SK_PASS;
	if (ctx->family != AF_INET || ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	if (ifindex == LOOPBACK_IFINDEX) {
		/* Turned around by pod_egress: plaintext from an unmeshed pod of
		 * this node to a PERMISSIVE pod. A pod's address is no local
		 * address, so only marked packets get this far. */
		if (!bpf_map_lookup_elem(&local_pods, &laddr))
			return SK_PASS;
		cfg = get_config();
		if (!cfg || !(cfg->flags & CFG_F_INBOUND_PLAIN_LOCAL))
			return SK_PASS;
		slot = SLOT_INBOUND_PLAIN;
		goto assign;
	}
	info = bpf_map_lookup_elem(&ifaces, &ifindex);
	if (!info)
		return SK_PASS;

	if (info->kind == IFACE_POD) {
		if (excluded(laddr, (__u16)ctx->local_port))
			return SK_PASS;
		slot = SLOT_OUTBOUND;
	} else if (info->kind == IFACE_UPLINK) {
		if (!bpf_map_lookup_elem(&local_pods, &laddr))
			return SK_PASS;
		if (ctx->local_port == PORT_HBONE) {
			slot = SLOT_HBONE;
		} else {
			cfg = get_config();
			if (!cfg || !(cfg->flags & CFG_F_INBOUND_PLAIN))
				return SK_PASS;
			slot = SLOT_INBOUND_PLAIN;
		}
	} else {
		return SK_PASS;
	}

assign:
	sk = bpf_map_lookup_elem(&listeners, &slot);
	if (!sk) {
		/* Fail closed: never let a captured connection through in
		 * plaintext because the ztunnel is away. */
		COUNT(no_listener);
		return SK_DROP;
	}
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		COUNT(lookup_failed);
		return SK_DROP;
	}
	if (slot == SLOT_OUTBOUND)
		COUNT(lookup_outbound);
	else if (slot == SLOT_HBONE)
		COUNT(lookup_hbone);
	else
		COUNT(lookup_inbound_plain);
	return SK_PASS;
}
