/*
 * kvmerge payload guest: a freestanding program that implements PROTOCOL.md.
 *
 * It runs at CPL 3 with an empty IDT, so any exception ends the VM. Hence no
 * privileged instructions (hlt, cli, ...), only baseline x86-64 (the build
 * keeps the compiler off SSE), and every address it touches must lie in the
 * identity-mapped first 4 GiB. Only vCPU 0 (the BSP) prints; the others check
 * in and idle.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Ports provided by the VMM. */
#define COM1_DATA 0x3f8
#define COM1_LSR 0x3fd
#define LSR_DATA_READY 0x01
#define LSR_THR_EMPTY 0x20
#define DEBUG_EXIT_PORT 0xf4
#define IDLE_PORT 0xf5
#define I8042_COMMAND_PORT 0x64
#define I8042_CMD_RESET 0xfe

#define EXIT_CODE_ERROR 250

/* boot_params (the Linux zero page) fields. */
#define BP_EXT_RAMDISK_IMAGE 0x0c0
#define BP_EXT_RAMDISK_SIZE 0x0c4
#define BP_EXT_CMD_LINE_PTR 0x0c8
#define BP_E820_ENTRIES 0x1e8
#define BP_RAMDISK_IMAGE 0x218
#define BP_RAMDISK_SIZE 0x21c
#define BP_CMD_LINE_PTR 0x228
#define BP_E820_TABLE 0x2d0
#define E820_MAX_ENTRIES 128 /* slots in the zero page */
#define E820_ENTRY_SIZE 20
#define E820_TYPE_RAM 1

/* MP specification 1.4 structures. */
#define MPF_SIZE 16
#define MPF_PHYSPTR 4
#define MPF_LENGTH 8 /* in 16-byte units; 1 for the 1.4 floating pointer */
#define MPC_LENGTH 4
#define MPC_ENTRY_COUNT 34
#define MPC_HEADER_SIZE 44
#define MPC_TYPE_PROCESSOR 0
#define MPC_TYPE_LAST_KNOWN 4 /* bus, I/O APIC, I/O and local interrupt entries */
#define MPC_PROCESSOR_SIZE 20
#define MPC_OTHER_SIZE 8
#define MPC_CPU_FLAGS 3
#define MPC_CPU_ENABLED 0x01

/* Only the first 4 GiB of guest-physical space are mapped. */
#define MAPPED_LIMIT (1ULL << 32)

/* Upper bound on the command line scan in case the VMM forgot the NUL. */
#define CMDLINE_MAX 4096

#define FILL_BASE 0x400000ULL
#define PAGE_SIZE 4096
#define WORDS_PER_PAGE (PAGE_SIZE / 8)

/* then=console: longest input line kept; the rest of a longer line is dropped. */
#define CONSOLE_LINE_MAX 256

/* Each idle-port read blocks for up to 10 ms, so this is ~10 s at worst. */
#define SMP_MAX_POLLS 1000
#define IDLE_POLL_MS 10

/* then=churn (see the churn section below). */
#define CHURN_MAX_PAGES (1024ULL << 8) /* 1 GiB of fill in 4 KiB pages */
#define CHURN_MAX_ROUNDS 16383	       /* fits the 14-bit round of a page's state */
#define CHURN_DEFAULT_IDLE_MS 200
#define CHURN_MAX_IDLE_MS 3600000
#define CHURN_MISMATCH_EXIT 3
#define CHURN_REPORT_MAX 10

/*
 * Incremented once by every application processor, read by the BSP. 64-bit
 * because entry.S also increments it (lock incq) for vCPUs without a stack.
 * Guest RAM starts zeroed, so .bss needs no clearing.
 */
uint64_t payload_ap_checkins;

_Noreturn void payload_main(uint64_t cpu, uint64_t boot_params);

/*
 * gcc may emit calls to these for struct copies and loops even in a
 * freestanding build. The string instructions are baseline x86-64, allowed in
 * ring 3, and cannot be turned back into calls to memset/memcpy themselves.
 * DF is clear at entry (RFLAGS = 0x2) and by ABI afterwards.
 */
void *memset(void *dst, int c, size_t n)
{
	void *d = dst;

	__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return dst;
}

void *memcpy(void *restrict dst, const void *restrict src, size_t n)
{
	void *d = dst;

	__asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
	return dst;
}

/* ---- Port I/O and guest-physical memory access ---- */

static inline void outb(uint16_t port, uint8_t val)
{
	__asm__ volatile("outb %0, %1" : : "a"(val), "Nd"(port));
}

static inline void outl(uint16_t port, uint32_t val)
{
	__asm__ volatile("outl %0, %1" : : "a"(val), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t val;

	__asm__ volatile("inb %1, %0" : "=a"(val) : "Nd"(port));
	return val;
}

/*
 * Blocks in the VMM for up to 10 ms: the ring-3 substitute for hlt. The
 * memory clobber makes every wait loop re-read shared state.
 */
static inline void idle_poll(void)
{
	__asm__ volatile("inb %0, %%al" : : "i"(IDLE_PORT) : "eax", "memory");
}

/* The identity map makes a guest-physical address a valid pointer. */
static inline const void *phys(uint64_t addr)
{
	return (const void *)(uintptr_t)addr;
}

/* Firmware tables are byte-packed: load through memcpy, which is alignment-safe. */
static inline uint8_t load8(uint64_t addr)
{
	return *(const uint8_t *)phys(addr);
}

static inline uint16_t load16(uint64_t addr)
{
	uint16_t v;

	__builtin_memcpy(&v, phys(addr), sizeof(v));
	return v;
}

static inline uint32_t load32(uint64_t addr)
{
	uint32_t v;

	__builtin_memcpy(&v, phys(addr), sizeof(v));
	return v;
}

static inline uint64_t load64(uint64_t addr)
{
	uint64_t v;

	__builtin_memcpy(&v, phys(addr), sizeof(v));
	return v;
}

static bool phys_bytes_eq(uint64_t addr, const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (load8(addr + i) != (uint8_t)s[i])
			return false;
	return true;
}

/* ---- Serial console (only the BSP prints, so no locking) ---- */

static void put_char(char c)
{
	while (!(inb(COM1_LSR) & LSR_THR_EMPTY))
		;
	outb(COM1_DATA, (uint8_t)c);
}

static void put_mem(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		put_char(s[i]);
}

static void put_str(const char *s)
{
	while (*s)
		put_char(*s++);
}

/* Lower-case hex, no prefix, no leading zeros ("0" for zero). */
static void put_hex(uint64_t v)
{
	char buf[16];
	size_t n = 0;

	do {
		buf[n++] = "0123456789abcdef"[v & 0xf];
		v >>= 4;
	} while (v);
	while (n)
		put_char(buf[--n]);
}

/* A console byte: printable ASCII as is, anything else as \xHH (so "\" itself is "\x5c"). */
static void put_escaped(uint8_t c)
{
	if (c >= 0x20 && c < 0x7f && c != '\\') {
		put_char((char)c);
		return;
	}
	put_str("\\x");
	put_char("0123456789abcdef"[c >> 4]);
	put_char("0123456789abcdef"[c & 0xf]);
}

static void put_dec(uint64_t v)
{
	char buf[20];
	size_t n = 0;

	do {
		buf[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		put_char(buf[--n]);
}

/* ---- Ending the run ---- */

static _Noreturn void idle_forever(void)
{
	for (;;)
		idle_poll();
}

/* The VMM may take a moment to stop the VM, so keep idling after the write. */
static _Noreturn void debug_exit(uint32_t code)
{
	outl(DEBUG_EXIT_PORT, code);
	idle_forever();
}

/* i8042 "pulse reset line": the VMM ends the VM as a clean reset. */
static _Noreturn void reset(void)
{
	outb(I8042_COMMAND_PORT, I8042_CMD_RESET);
	idle_forever();
}

/* #UD with no IDT escalates to a triple fault. */
static _Noreturn void crash(void)
{
	__asm__ volatile("ud2");
	__builtin_unreachable();
}

static _Noreturn void fail(const char *reason)
{
	put_str("PAYLOAD-ERROR ");
	put_str(reason);
	put_char('\n');
	debug_exit(EXIT_CODE_ERROR);
}

/* ---- Command line ---- */

struct str {
	const char *p;
	size_t len;
};

static bool str_eq(struct str s, const char *lit)
{
	size_t i;

	for (i = 0; i < s.len; i++)
		if (lit[i] == '\0' || lit[i] != s.p[i])
			return false;
	return lit[i] == '\0';
}

static bool is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* Decimal only; rejects empty strings, other characters and overflow. */
static bool parse_u64(struct str s, uint64_t *out)
{
	uint64_t v = 0;

	if (s.len == 0)
		return false;
	for (size_t i = 0; i < s.len; i++) {
		char c = s.p[i];

		if (c < '0' || c > '9')
			return false;
		uint64_t digit = (uint64_t)(c - '0');
		if (v > (UINT64_MAX - digit) / 10)
			return false;
		v = v * 10 + digit;
	}
	*out = v;
	return true;
}

static struct str read_cmdline(uint64_t boot_params)
{
	uint64_t addr = load32(boot_params + BP_CMD_LINE_PTR) |
			(uint64_t)load32(boot_params + BP_EXT_CMD_LINE_PTR) << 32;
	struct str s = { phys(addr), 0 };

	if (addr == 0)
		return s;
	if (addr >= MAPPED_LIMIT)
		fail("cmdline above 4 GiB");

	uint64_t max = MAPPED_LIMIT - addr < CMDLINE_MAX ? MAPPED_LIMIT - addr : CMDLINE_MAX;
	while (s.len < max && s.p[s.len] != '\0')
		s.len++;
	return s;
}

struct param {
	struct str key;
	struct str val; /* empty when there is no '=' */
	bool has_val;
};

/*
 * Splits the command line the way Linux does: parameters are separated by
 * whitespace outside double quotes, the key ends at the first '=', and quotes
 * around the value are dropped (so echo="a b" prints "a b").
 */
static bool next_param(struct str *rest, struct param *out)
{
	const char *p = rest->p;
	const char *end = rest->p + rest->len;
	bool quoted = false;

	while (p < end && is_space(*p))
		p++;
	if (p == end)
		return false;

	const char *start = p;
	const char *eq = NULL;

	for (; p < end && (quoted || !is_space(*p)); p++) {
		if (*p == '"')
			quoted = !quoted;
		else if (*p == '=' && !eq && !quoted)
			eq = p;
	}
	rest->p = p;
	rest->len = (size_t)(end - p);

	if (!eq) {
		*out = (struct param){ { start, (size_t)(p - start) }, { p, 0 }, false };
		return true;
	}

	const char *val = eq + 1;
	const char *val_end = p;

	if (val < val_end && *val == '"') {
		val++;
		if (val < val_end && val_end[-1] == '"')
			val_end--;
	}
	*out = (struct param){ { start, (size_t)(eq - start) },
			       { val, (size_t)(val_end - val) },
			       true };
	return true;
}

enum then_action { THEN_EXIT, THEN_IDLE, THEN_CRASH, THEN_RESET, THEN_CONSOLE, THEN_CHURN };

struct config {
	uint64_t fill_mib;
	uint64_t patterns;
	uint64_t zeros_mib;
	uint64_t seed;
	uint64_t unique_pct;
	bool unique;
	enum then_action then;
	uint32_t exit_code;
	uint64_t churn_rounds;
	uint64_t churn_idle_ms;
	bool churn_selftest;
};

/* Splits s at the first ':' (head, tail); false when there is none. */
static bool split_colon(struct str s, struct str *head, struct str *tail)
{
	for (size_t i = 0; i < s.len; i++) {
		if (s.p[i] == ':') {
			*head = (struct str){ s.p, i };
			*tail = (struct str){ s.p + i + 1, s.len - i - 1 };
			return true;
		}
	}
	return false;
}

/* "ROUNDS" or "ROUNDS:IDLE_MS", the part of then=churn:... after "churn:". */
static bool parse_churn(struct str val, struct config *cfg)
{
	struct str rounds = val;
	struct str idle;
	uint64_t idle_ms = CHURN_DEFAULT_IDLE_MS;

	if (split_colon(val, &rounds, &idle) &&
	    (!parse_u64(idle, &idle_ms) || idle_ms > CHURN_MAX_IDLE_MS))
		return false;
	if (!parse_u64(rounds, &cfg->churn_rounds) || cfg->churn_rounds == 0 ||
	    cfg->churn_rounds > CHURN_MAX_ROUNDS)
		return false;
	cfg->then = THEN_CHURN;
	cfg->churn_idle_ms = idle_ms;
	return true;
}

static bool parse_then(struct str val, struct config *cfg)
{
	static const char exit_prefix[] = "exit:";
	const size_t prefix_len = sizeof(exit_prefix) - 1;
	static const char churn_prefix[] = "churn:";
	const size_t churn_len = sizeof(churn_prefix) - 1;

	if (val.len >= churn_len && str_eq((struct str){ val.p, churn_len }, churn_prefix))
		return parse_churn((struct str){ val.p + churn_len, val.len - churn_len }, cfg);
	if (str_eq(val, "idle")) {
		cfg->then = THEN_IDLE;
		return true;
	}
	if (str_eq(val, "crash")) {
		cfg->then = THEN_CRASH;
		return true;
	}
	if (str_eq(val, "reset")) {
		cfg->then = THEN_RESET;
		return true;
	}
	if (str_eq(val, "console")) {
		cfg->then = THEN_CONSOLE;
		return true;
	}
	if (val.len < prefix_len || !str_eq((struct str){ val.p, prefix_len }, exit_prefix))
		return false;

	uint64_t code;
	struct str digits = { val.p + prefix_len, val.len - prefix_len };

	if (!parse_u64(digits, &code) || code > 255)
		return false;
	cfg->then = THEN_EXIT;
	cfg->exit_code = (uint32_t)code;
	return true;
}

/*
 * Validates the whole command line before anything else is printed, so a bad
 * value yields just the error. Unknown parameters are ignored (a Linux-style
 * command line may carry other words); a known key without '=' is malformed.
 * For a repeated key the last value wins.
 */
static struct config parse_config(struct str cmdline)
{
	struct config cfg = { .fill_mib = 0, .patterns = 1, .then = THEN_EXIT, .exit_code = 0 };
	struct param prm;
	uint64_t selftest;

	while (next_param(&cmdline, &prm)) {
		if (str_eq(prm.key, "fill")) {
			if (!prm.has_val || !parse_u64(prm.val, &cfg.fill_mib))
				fail("bad fill");
		} else if (str_eq(prm.key, "patterns")) {
			if (!prm.has_val || !parse_u64(prm.val, &cfg.patterns) || cfg.patterns == 0)
				fail("bad patterns");
		} else if (str_eq(prm.key, "then")) {
			if (!prm.has_val || !parse_then(prm.val, &cfg))
				fail("bad then");
		} else if (str_eq(prm.key, "zeros")) {
			if (!prm.has_val || !parse_u64(prm.val, &cfg.zeros_mib))
				fail("bad zeros");
		} else if (str_eq(prm.key, "unique")) {
			if (!prm.has_val || !parse_u64(prm.val, &cfg.unique_pct) || cfg.unique_pct > 100)
				fail("bad unique");
			cfg.unique = true;
		} else if (str_eq(prm.key, "seed")) {
			if (!prm.has_val || !parse_u64(prm.val, &cfg.seed))
				fail("bad seed");
		} else if (str_eq(prm.key, "churn_selftest")) {
			if (!prm.has_val || !parse_u64(prm.val, &selftest) || selftest > 1)
				fail("bad churn_selftest");
			cfg.churn_selftest = selftest == 1;
		} else if (str_eq(prm.key, "echo")) {
			if (!prm.has_val)
				fail("bad echo");
		}
	}
	return cfg;
}

static void print_echoes(struct str cmdline)
{
	struct param prm;

	while (next_param(&cmdline, &prm)) {
		if (str_eq(prm.key, "echo")) {
			put_str("PAYLOAD-ECHO ");
			put_mem(prm.val.p, prm.val.len);
			put_char('\n');
		}
	}
}

/* ---- MP table: how many processors the VMM announced ---- */

static bool checksum_ok(uint64_t addr, uint64_t len)
{
	uint8_t sum = 0;

	for (uint64_t i = 0; i < len; i++)
		sum += load8(addr + i);
	return sum == 0;
}

/* Returns the address of a valid MP floating pointer in [start, end), or 0. */
static uint64_t mp_find_floating(uint64_t start, uint64_t end)
{
	for (uint64_t a = start; a + MPF_SIZE <= end; a += 16) {
		if (phys_bytes_eq(a, "_MP_", 4) && load8(a + MPF_LENGTH) == 1 &&
		    checksum_ok(a, MPF_SIZE))
			return a;
	}
	return 0;
}

/*
 * Counts the enabled processor entries of the MP configuration table. Returns
 * 0 when there is no usable table (none found, a bad checksum, or the "default
 * configuration" with no table, which kvmerge does not use).
 */
static uint64_t mp_count_cpus(void)
{
	uint64_t fp = mp_find_floating(0x9fc00, 0xa0000);

	if (!fp)
		fp = mp_find_floating(0xf0000, 0x100000);
	if (!fp)
		return 0;

	uint64_t table = load32(fp + MPF_PHYSPTR);
	if (table == 0 || !phys_bytes_eq(table, "PCMP", 4))
		return 0;

	uint64_t len = load16(table + MPC_LENGTH);
	if (len < MPC_HEADER_SIZE || table + len > MAPPED_LIMIT || !checksum_ok(table, len))
		return 0;

	uint64_t entries = load16(table + MPC_ENTRY_COUNT);
	uint64_t off = MPC_HEADER_SIZE;
	uint64_t cpus = 0;

	for (uint64_t i = 0; i < entries; i++) {
		uint8_t type = load8(table + off);
		uint64_t size;

		if (type == MPC_TYPE_PROCESSOR)
			size = MPC_PROCESSOR_SIZE;
		else if (type <= MPC_TYPE_LAST_KNOWN)
			size = MPC_OTHER_SIZE;
		else
			break; /* unknown size: cannot walk further */
		if (off + size > len)
			break;
		if (type == MPC_TYPE_PROCESSOR && (load8(table + off + MPC_CPU_FLAGS) & MPC_CPU_ENABLED))
			cpus++;
		off += size;
	}
	return cpus;
}

/* ---- SMP check-in ---- */

static _Noreturn void ap_main(void)
{
	__atomic_fetch_add(&payload_ap_checkins, 1, __ATOMIC_RELEASE);
	idle_forever();
}

static void wait_for_aps(uint64_t cpus)
{
	for (unsigned polls = 0;
	     __atomic_load_n(&payload_ap_checkins, __ATOMIC_ACQUIRE) < cpus - 1; polls++) {
		if (polls == SMP_MAX_POLLS)
			fail("smp");
		idle_poll();
	}
}

/* ---- Initrd ---- */

struct range {
	uint64_t start;
	uint64_t size;
};

static struct range read_initrd(uint64_t boot_params)
{
	struct range r = {
		load32(boot_params + BP_RAMDISK_IMAGE) |
			(uint64_t)load32(boot_params + BP_EXT_RAMDISK_IMAGE) << 32,
		load32(boot_params + BP_RAMDISK_SIZE) |
			(uint64_t)load32(boot_params + BP_EXT_RAMDISK_SIZE) << 32,
	};

	if (r.size && (r.start >= MAPPED_LIMIT || r.size > MAPPED_LIMIT - r.start))
		fail("initrd above 4 GiB");
	return r;
}

/* Wrapping sum of the bytes, read a word at a time (the tail byte-wise). */
static uint64_t byte_sum(uint64_t addr, uint64_t len)
{
	uint64_t sum = 0;
	uint64_t i = 0;

	for (; i + 8 <= len; i += 8) {
		uint64_t w = load64(addr + i);

		/* Add the eight bytes via two rounds of pairwise lane sums (no carries cross lanes). */
		w = (w & 0x00ff00ff00ff00ffULL) + ((w >> 8) & 0x00ff00ff00ff00ffULL);
		w = (w & 0x0000ffff0000ffffULL) + ((w >> 16) & 0x0000ffff0000ffffULL);
		sum += (w & 0xffffffffULL) + (w >> 32);
	}
	for (; i < len; i++)
		sum += load8(addr + i);
	return sum;
}

/* ---- Memory fill ---- */

static uint64_t splitmix64(uint64_t x)
{
	uint64_t z = x + 0x9e3779b97f4a7c15ULL;

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

/* End of the e820 RAM entry that contains addr, or 0 if none does. */
static uint64_t e820_ram_end(uint64_t boot_params, uint64_t addr)
{
	uint64_t n = load8(boot_params + BP_E820_ENTRIES);

	if (n > E820_MAX_ENTRIES)
		n = E820_MAX_ENTRIES;
	for (uint64_t i = 0; i < n; i++) {
		uint64_t e = boot_params + BP_E820_TABLE + i * E820_ENTRY_SIZE;
		uint64_t base = load64(e);
		uint64_t size = load64(e + 8);

		if (load32(e + 16) == E820_TYPE_RAM && base <= addr && addr - base < size)
			return base + size < base ? UINT64_MAX : base + size;
	}
	return 0;
}

/*
 * Size in bytes of the fill, after checking that it stays inside the RAM
 * entry holding FILL_BASE, inside the mapped 4 GiB and clear of the initrd.
 */
static uint64_t fill_bytes(uint64_t boot_params, uint64_t mib, struct range initrd)
{
	if (mib == 0)
		return 0;
	if (mib > (MAPPED_LIMIT - FILL_BASE) >> 20) /* also keeps mib << 20 from overflowing */
		fail("fill does not fit");

	uint64_t bytes = mib << 20;
	uint64_t end = FILL_BASE + bytes;

	if (end > e820_ram_end(boot_params, FILL_BASE))
		fail("fill does not fit");
	if (initrd.size && initrd.start < end && FILL_BASE < initrd.start + initrd.size)
		fail("fill does not fit");
	return bytes;
}

/*
 * Size in bytes of zeros=MIB, the area right after the fill (at 4 MiB when
 * there is no fill), with the same checks as the fill.
 */
static uint64_t zeros_bytes(uint64_t boot_params, uint64_t fill, uint64_t mib, struct range initrd)
{
	uint64_t base = FILL_BASE + fill;

	if (mib == 0)
		return 0;
	if (mib > (MAPPED_LIMIT - base) >> 20) /* also keeps mib << 20 from overflowing */
		fail("zeros does not fit");

	uint64_t bytes = mib << 20;
	uint64_t end = base + bytes;

	if (end > e820_ram_end(boot_params, FILL_BASE))
		fail("zeros does not fit");
	if (initrd.size && initrd.start < end && base < initrd.start + initrd.size)
		fail("zeros does not fit");
	return bytes;
}

/*
 * Explicit zero stores, so every page becomes resident (and all-zero) in the
 * VMM even though guest RAM starts zeroed.
 */
static void zero_words(uint64_t *base, uint64_t words)
{
	for (uint64_t i = 0; i < words; i++)
		base[i] = 0;
}

/* Page i gets pattern p = i mod k; word w of pattern p is splitmix64(p * 512 + w). */
static void fill_pages(uint64_t *base, uint64_t pages, uint64_t k)
{
	uint64_t p = 0;

	for (uint64_t i = 0; i < pages; i++) {
		uint64_t *page = base + i * WORDS_PER_PAGE;
		uint64_t first = p * WORDS_PER_PAGE;

		for (uint64_t w = 0; w < WORDS_PER_PAGE; w++)
			page[w] = splitmix64(first + w);
		if (++p == k)
			p = 0;
	}
}

#define UNIQUE_TAG 0x554e000000000000ULL /* "UN" */

/*
 * unique=PCT: makes PCT% of the fill's pages, spread evenly over it, differ from
 * every other VM's (word 0 of the page gets a value from seed and the page
 * number). Returns how many pages it wrote.
 */
static uint64_t make_unique(uint64_t *base, uint64_t pages, uint64_t pct, uint64_t seed)
{
	uint64_t written = 0;

	for (uint64_t i = 0; i < pages; i++) {
		if ((i + 1) * pct / 100 == i * pct / 100)
			continue;
		base[i * WORDS_PER_PAGE] = splitmix64(splitmix64(seed ^ UNIQUE_TAG) + i);
		written++;
	}
	return written;
}

static uint64_t word_sum(const uint64_t *base, uint64_t words)
{
	uint64_t sum = 0;

	for (uint64_t i = 0; i < words; i++)
		sum += base[i];
	return sum;
}

/* ---- Churn (then=churn): rewrite, idle, re-verify, in rounds ---- */

/*
 * What a fill page holds. The content of every non-zero kind is
 * splitmix64(key + w) for word w, with the key from churn_key().
 */
enum page_kind {
	KIND_FILL = 0,	/* the fill's pattern i mod K (key (i mod K) * 512) */
	KIND_ZERO = 1,	/* all zero */
	KIND_SHARED = 2, /* depends on the round and i mod K only: the same in every VM */
	KIND_UNIQUE = 3, /* depends on the seed, the round and i: unique to this VM and page */
	KIND_KEEP = 4,	/* schedule only: leave the page as it is this round */
};

#define SHARED_TAG 0x5348000000000000ULL /* "SH" */
#define UNIQUE_TAG 0x554e000000000000ULL /* "UN" */

/*
 * Round r rewrites non-static page i as churn_schedule[(i + r) mod 12]. Over
 * 12 rounds a page sees every write-after-write pair of {zero, shared, unique}
 * and is kept unchanged for a round after each kind; every round rewrites a
 * quarter of the pages with each kind and keeps a quarter. Static pages
 * (i mod 8 == 7) keep their fill content for the whole run.
 */
#define CHURN_SCHEDULE_LEN 12
#define CHURN_STATIC_PERIOD 8

static const uint8_t churn_schedule[CHURN_SCHEDULE_LEN] = {
	KIND_ZERO,   KIND_KEEP,	  KIND_ZERO,   KIND_SHARED, KIND_KEEP,	 KIND_SHARED,
	KIND_UNIQUE, KIND_KEEP,	  KIND_UNIQUE, KIND_ZERO,   KIND_UNIQUE, KIND_SHARED,
};

/*
 * What the payload believes page i holds: kind << 14 | round of the last
 * write (0 for the fill). 2 bytes a page keep 1 GiB of fill at 512 KiB of
 * .bss; it is guest RAM too, so it is merged and reclaimed like the rest.
 */
#define STATE_ROUND_BITS 14
static uint16_t churn_state[CHURN_MAX_PAGES];

static inline uint16_t churn_state_of(enum page_kind kind, uint64_t round)
{
	return (uint16_t)((unsigned)kind << STATE_ROUND_BITS | (unsigned)round);
}

struct churn_ctx {
	uint64_t *area;
	uint64_t pages;
	uint64_t patterns;
	uint64_t seed;
};

static uint64_t churn_key(const struct churn_ctx *c, enum page_kind kind, uint64_t i, uint64_t round)
{
	switch (kind) {
	case KIND_SHARED:
		return splitmix64(splitmix64(SHARED_TAG | round) + i % c->patterns);
	case KIND_UNIQUE:
		return splitmix64(splitmix64(splitmix64(UNIQUE_TAG | round) + c->seed) + i);
	default: /* KIND_FILL (KIND_ZERO has no key) */
		return i % c->patterns * WORDS_PER_PAGE;
	}
}

static void write_page(uint64_t *page, enum page_kind kind, uint64_t key)
{
	if (kind == KIND_ZERO) {
		zero_words(page, WORDS_PER_PAGE);
		return;
	}
	for (uint64_t w = 0; w < WORDS_PER_PAGE; w++)
		page[w] = splitmix64(key + w);
}

static inline uint64_t expected_word(enum page_kind kind, uint64_t key, uint64_t w)
{
	return kind == KIND_ZERO ? 0 : splitmix64(key + w);
}

/*
 * Whether the page differs from the expected content; *word is then the first
 * differing word, or WORDS_PER_PAGE if the page changed back between the two
 * passes (which nothing in the guest does: still a failure).
 */
static bool page_differs(const uint64_t *page, enum page_kind kind, uint64_t key, uint64_t *word)
{
	uint64_t diff = 0;

	/* Branch-free pass first; only a bad page pays for finding the word. */
	if (kind == KIND_ZERO) {
		for (uint64_t w = 0; w < WORDS_PER_PAGE; w++)
			diff |= page[w];
	} else {
		for (uint64_t w = 0; w < WORDS_PER_PAGE; w++)
			diff |= page[w] ^ splitmix64(key + w);
	}
	if (!diff)
		return false;
	for (*word = 0; *word < WORDS_PER_PAGE; (*word)++)
		if (page[*word] != expected_word(kind, key, *word))
			break;
	return true;
}

struct mismatch {
	uint64_t page;
	uint64_t word;
	uint64_t got;
	uint64_t want;
};

static struct mismatch churn_reports[CHURN_REPORT_MAX];

/* Rewrites every page the schedule picks for this round and records its new state. */
static void churn_write(const struct churn_ctx *c, uint64_t round)
{
	for (uint64_t i = 0; i < c->pages; i++) {
		if (i % CHURN_STATIC_PERIOD == CHURN_STATIC_PERIOD - 1)
			continue;

		enum page_kind kind = churn_schedule[(i + round) % CHURN_SCHEDULE_LEN];

		if (kind == KIND_KEEP)
			continue;
		write_page(c->area + i * WORDS_PER_PAGE, kind, churn_key(c, kind, i, round));
		churn_state[i] = churn_state_of(kind, round);
	}
}

/*
 * Re-reads every page against its recorded state. A bad page is reported (the
 * first CHURN_REPORT_MAX over the run), then rewritten with what it should
 * hold, so one lost write is counted once and later rounds check fresh data.
 */
static uint64_t churn_verify(const struct churn_ctx *c, uint64_t *reported)
{
	uint64_t bad = 0;

	for (uint64_t i = 0; i < c->pages; i++) {
		uint64_t *page = c->area + i * WORDS_PER_PAGE;
		uint16_t st = churn_state[i];
		enum page_kind kind = (enum page_kind)(st >> STATE_ROUND_BITS);
		uint64_t round = st & ((1u << STATE_ROUND_BITS) - 1);
		uint64_t key = kind == KIND_ZERO ? 0 : churn_key(c, kind, i, round);
		uint64_t w;

		if (!page_differs(page, kind, key, &w))
			continue;
		bad++;
		if (*reported < CHURN_REPORT_MAX) {
			struct mismatch *m = &churn_reports[(*reported)++];

			*m = (struct mismatch){ i, w, 0, 0 };
			if (w < WORDS_PER_PAGE) {
				m->got = page[w];
				m->want = expected_word(kind, key, w);
			}
		}
		write_page(page, kind, key);
	}
	return bad;
}

static _Noreturn void churn(uint64_t *area, uint64_t pages, const struct config *cfg)
{
	const struct churn_ctx c = { area, pages, cfg->patterns, cfg->seed };
	const uint64_t idle_polls = (cfg->churn_idle_ms + IDLE_POLL_MS - 1) / IDLE_POLL_MS;
	uint64_t verified = 0;
	uint64_t mismatches = 0;
	uint64_t reported = 0;

	for (uint64_t i = 0; i < pages; i++)
		churn_state[i] = churn_state_of(KIND_FILL, 0);

	for (uint64_t round = 1; round <= cfg->churn_rounds; round++) {
		churn_write(&c, round);
		if (cfg->churn_selftest && round == 1) {
			/* Self-test: one wrong word behind the recorded state's back. */
			uint64_t *victim = area + pages / 2 * WORDS_PER_PAGE + 7;

			*victim = ~*victim;
		}
		/* Verification must re-read memory after the idle, not reuse what was written. */
		__asm__ volatile("" : : : "memory");
		for (uint64_t n = 0; n < idle_polls; n++)
			idle_poll();

		uint64_t bad = churn_verify(&c, &reported);

		verified += pages;
		mismatches += bad;
		put_str("PAYLOAD-CHURN round=");
		put_dec(round);
		put_str(" pages=");
		put_dec(pages);
		put_str(" mismatches=");
		put_dec(bad);
		put_char('\n');
	}

	put_str("PAYLOAD-CHURNED rounds=");
	put_dec(cfg->churn_rounds);
	put_str(" pages=");
	put_dec(verified);
	put_str(" mismatches=");
	put_dec(mismatches);
	put_char('\n');
	if (mismatches == 0)
		debug_exit(0);
	for (uint64_t n = 0; n < reported; n++) {
		put_str("PAYLOAD-MISMATCH page=");
		put_dec(churn_reports[n].page);
		put_str(" word=");
		put_dec(churn_reports[n].word);
		put_str(" got=");
		put_hex(churn_reports[n].got);
		put_str(" want=");
		put_hex(churn_reports[n].want);
		put_char('\n');
	}
	debug_exit(CHURN_MISMATCH_EXIT);
}

/* ---- Interactive console (then=console) ---- */

/* Polls the UART's receive side: no interrupts are needed (the IDT is empty anyway). */
static uint8_t get_char(void)
{
	while (!(inb(COM1_LSR) & LSR_DATA_READY))
		idle_poll();
	return inb(COM1_DATA);
}

/*
 * Reads one non-empty line ended by '\r' or '\n' (so "\r\n" ends one line and an
 * empty one, which is skipped). Bytes past CONSOLE_LINE_MAX are dropped.
 */
static struct str get_line(char *buf)
{
	size_t len = 0;

	for (;;) {
		uint8_t c = get_char();

		if (c == '\r' || c == '\n') {
			if (len)
				return (struct str){ buf, len };
			continue;
		}
		if (len < CONSOLE_LINE_MAX)
			buf[len++] = (char)c;
	}
}

/* Echoes every line; "quit" ends with debug-exit 0, "exit N" (0..255) with N. */
static _Noreturn void console_loop(void)
{
	static const char exit_prefix[] = "exit ";
	const size_t prefix_len = sizeof(exit_prefix) - 1;
	static char buf[CONSOLE_LINE_MAX];

	put_str("PAYLOAD-CONSOLE\n");
	for (;;) {
		struct str line = get_line(buf);
		uint64_t code;

		put_str("PAYLOAD-GOT ");
		for (size_t i = 0; i < line.len; i++)
			put_escaped((uint8_t)line.p[i]);
		put_char('\n');

		if (str_eq(line, "quit"))
			debug_exit(0);
		if (line.len > prefix_len &&
		    str_eq((struct str){ line.p, prefix_len }, exit_prefix) &&
		    parse_u64((struct str){ line.p + prefix_len, line.len - prefix_len }, &code) &&
		    code <= 255)
			debug_exit((uint32_t)code);
	}
}

/* ---- Entry ---- */

static _Noreturn void bsp_main(uint64_t boot_params)
{
	uint64_t cpus = mp_count_cpus();

	if (cpus == 0)
		cpus = 1; /* no usable MP table: uniprocessor */
	wait_for_aps(cpus);
	put_str("PAYLOAD-READY cpus=");
	put_dec(cpus);
	put_char('\n');

	struct str cmdline = read_cmdline(boot_params);
	struct config cfg = parse_config(cmdline);
	struct range initrd = read_initrd(boot_params);
	uint64_t fill = fill_bytes(boot_params, cfg.fill_mib, initrd);
	uint64_t zeros = zeros_bytes(boot_params, fill, cfg.zeros_mib, initrd);

	if (cfg.then == THEN_CHURN && fill == 0)
		fail("churn needs fill");
	if (cfg.then == THEN_CHURN && fill / PAGE_SIZE > CHURN_MAX_PAGES)
		fail("churn fill too large");

	print_echoes(cmdline);

	if (initrd.size) {
		put_str("PAYLOAD-INITRD size=");
		put_hex(initrd.size);
		put_str(" sum=");
		put_hex(byte_sum(initrd.start, initrd.size));
		put_char('\n');
	}

	if (fill) {
		uint64_t *area = (uint64_t *)(uintptr_t)FILL_BASE;

		fill_pages(area, fill / PAGE_SIZE, cfg.patterns);
		/* The sum must come from memory re-read after the whole fill, not from registers. */
		__asm__ volatile("" : : : "memory");
		put_str("PAYLOAD-FILLED sum=");
		put_hex(word_sum(area, fill / 8));
		put_char('\n');
	}

	if (cfg.unique) {
		put_str("PAYLOAD-UNIQUE pages=");
		put_dec(make_unique((uint64_t *)(uintptr_t)FILL_BASE, fill / PAGE_SIZE,
				    cfg.unique_pct, cfg.seed));
		put_char('\n');
	}

	if (zeros) {
		zero_words((uint64_t *)(uintptr_t)(FILL_BASE + fill), zeros / 8);
		put_str("PAYLOAD-ZEROED ");
		put_dec(cfg.zeros_mib);
		put_char('\n');
	}

	switch (cfg.then) {
	case THEN_EXIT:
		debug_exit(cfg.exit_code);
	case THEN_CRASH:
		crash();
	case THEN_RESET:
		reset();
	case THEN_CONSOLE:
		console_loop();
	case THEN_CHURN:
		churn((uint64_t *)(uintptr_t)FILL_BASE, fill / PAGE_SIZE, &cfg);
	case THEN_IDLE:
		break;
	}
	idle_forever();
}

_Noreturn void payload_main(uint64_t cpu, uint64_t boot_params)
{
	if (cpu != 0)
		ap_main();
	bsp_main(boot_params);
}
