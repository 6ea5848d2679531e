// op_driver: C-simulation test driver of the m3vit HLS header library.
//
//   op_driver REQUEST RESPONSE
//
// REQUEST holds records (little-endian int64 throughout; a string is its length then its bytes):
//   n_records, then per record: op name, n_params, (name, value) * n_params,
//                               n_arrays, (name, length, values) * n_arrays
// RESPONSE holds, per record: n_arrays, (name, length, values) * n_arrays.
// Each record runs one kernel of the library on the build's CFG (m3v_config.h). This file is
// test scaffolding, not kernel code: it may use the standard library freely.
#include <cstdint>
#include <cstdio>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "m3v.h"
#include "m3v_config.h"

namespace {

typedef m3v::config CFG;
typedef CFG::act_t act_t;
typedef CFG::wgt_t wgt_t;
typedef CFG::acc_t acc_t;
typedef std::vector<int64_t> Vec;

struct Fail : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// ------------------------------------------------------------------ I/O

struct Reader {
    FILE *f;
    int64_t i64() {
        int64_t v;
        if (std::fread(&v, sizeof v, 1, f) != 1)
            throw Fail("truncated request");
        return v;
    }
    std::string str() {
        const int64_t n = i64();
        std::string s(static_cast<size_t>(n), '\0');
        if (n && std::fread(&s[0], 1, static_cast<size_t>(n), f) != static_cast<size_t>(n))
            throw Fail("truncated request");
        return s;
    }
    Vec vec() {
        const int64_t n = i64();
        Vec v(static_cast<size_t>(n));
        if (n && std::fread(v.data(), sizeof(int64_t), v.size(), f) != v.size())
            throw Fail("truncated request");
        return v;
    }
};

struct Writer {
    FILE *f;
    void i64(int64_t v) { std::fwrite(&v, sizeof v, 1, f); }
    void str(const std::string &s) {
        i64(static_cast<int64_t>(s.size()));
        std::fwrite(s.data(), 1, s.size(), f);
    }
    void vec(const Vec &v) {
        i64(static_cast<int64_t>(v.size()));
        if (!v.empty())
            std::fwrite(v.data(), sizeof(int64_t), v.size(), f);
    }
};

struct Call {
    std::string op;
    std::map<std::string, int64_t> params;
    std::map<std::string, Vec> arrays;
    std::vector<std::pair<std::string, Vec>> out;

    int64_t p(const std::string &k) const {
        auto it = params.find(k);
        if (it == params.end())
            throw Fail(op + ": missing parameter '" + k + "'");
        return it->second;
    }
    int64_t p(const std::string &k, int64_t dflt) const {
        auto it = params.find(k);
        return it == params.end() ? dflt : it->second;
    }
    // The array k, zero-padded to n elements (an absent array is all zeros).
    Vec a(const std::string &k, size_t n) const {
        Vec v(n, 0);
        auto it = arrays.find(k);
        if (it != arrays.end()) {
            if (it->second.size() > n)
                throw Fail(op + ": array '" + k + "' has " + std::to_string(it->second.size()) +
                           " values, at most " + std::to_string(n) + " expected");
            std::copy(it->second.begin(), it->second.end(), v.begin());
        }
        return v;
    }
    // A run-time format held by a `width`-bit signed container (unsigned formats: width - 1 bits).
    m3v::fmt_t fmt(const std::string &pre, int width = CFG::ACT_BITS) const {
        const int64_t bits = p(pre + "_bits");
        const bool is_signed = p(pre + "_signed", 1) != 0;
        if (bits < 1 || bits > (is_signed ? width : width - 1))
            throw Fail(op + ": format '" + pre + "' does not fit a " + std::to_string(width) + "-bit container");
        m3v::fmt_t f;
        f.bits = static_cast<int>(bits);
        f.frac = static_cast<int>(p(pre + "_frac", 0));
        f.is_signed = is_signed;
        return f;
    }
    void put(const std::string &k, Vec v) { out.emplace_back(k, std::move(v)); }
};

void need(bool ok, const std::string &msg) {
    if (!ok)
        throw Fail(msg);
}

template <class T>
std::vector<T> to_ap(const Vec &v) {
    std::vector<T> r(v.size());
    for (size_t i = 0; i < v.size(); i++)
        r[i] = static_cast<long long>(v[i]);
    return r;
}

template <class T>
Vec from_ap(const std::vector<T> &v) {
    Vec r(v.size());
    for (size_t i = 0; i < v.size(); i++)
        r[i] = v[i].to_int64();
    return r;
}

int64_t cnt(const m3v::sat_cnt_t &c) { return static_cast<int64_t>(c.to_uint64()); }

size_t sz(int64_t n) { return static_cast<size_t>(n < 0 ? 0 : n); }

// ------------------------------------------------------------------ primitives and nonlinear units

void op_rshift_round(Call &c) {
    const Vec x = c.a("x", c.arrays.at("x").size());
    const int s = static_cast<int>(c.p("s"));
    Vec y(x.size());
    for (size_t i = 0; i < x.size(); i++)
        y[i] = m3v::rshift_round<64>(ap_int<63>(static_cast<long long>(x[i])), s).to_int64();
    c.put("y", y);
}

void op_saturate(Call &c) {
    const Vec x = c.arrays.at("x");
    const m3v::fmt_t f = c.fmt("fmt", 64);
    m3v::sat_cnt_t sat = 0;
    Vec y(x.size());
    for (size_t i = 0; i < x.size(); i++)
        y[i] = m3v::saturate<64>(ap_int<64>(static_cast<long long>(x[i])), f, sat).to_int64();
    c.put("y", y);
    c.put("sat", Vec{cnt(sat)});
}

void op_requant(Call &c) {
    const Vec x = c.arrays.at("x");
    const m3v::fmt_t f = c.fmt("fmt", 64);
    const int s = static_cast<int>(c.p("s"));
    m3v::sat_cnt_t sat = 0;
    Vec y(x.size());
    for (size_t i = 0; i < x.size(); i++)
        y[i] = m3v::requant<64>(ap_int<63>(static_cast<long long>(x[i])), s, f, sat).to_int64();
    c.put("y", y);
    c.put("sat", Vec{cnt(sat)});
}

void op_exp_int(Call &c) {
    const Vec t = c.arrays.at("t");
    const int frac = static_cast<int>(c.p("frac"));
    Vec y(t.size());
    for (size_t i = 0; i < t.size(); i++) {
        need(t[i] >= 0 && t[i] < (int64_t(1) << m3v::EXP_ARG_BITS), "exp_int: t outside [0, 2^17)");
        y[i] = m3v::exp_int(ap_uint<m3v::EXP_ARG_BITS>(static_cast<unsigned long long>(t[i])), frac).to_int64();
    }
    c.put("p", y);
}

void op_recip_int(Call &c) {
    const Vec s = c.arrays.at("S");
    Vec r(s.size()), k(s.size());
    for (size_t i = 0; i < s.size(); i++) {
        need(s[i] >= 1, "recip_int: S must be >= 1");
        m3v::recip_t rr;
        int kk;
        m3v::recip_int(ap_uint<63>(static_cast<unsigned long long>(s[i])), rr, kk);
        r[i] = rr.to_int64();
        k[i] = kk;
    }
    c.put("r", r);
    c.put("k", k);
}

void op_rsqrt_int(Call &c) {
    const Vec u = c.arrays.at("u");
    Vec r(u.size()), e(u.size());
    for (size_t i = 0; i < u.size(); i++) {
        need(u[i] >= 1, "rsqrt_int: u must be >= 1");
        m3v::rsqrt_t rr;
        int ee;
        m3v::rsqrt_int(ap_uint<63>(static_cast<unsigned long long>(u[i])), rr, ee);
        r[i] = rr.to_int64();
        e[i] = ee;
    }
    c.put("r", r);
    c.put("e", e);
}

void op_gelu(Call &c) {
    const Vec x = c.arrays.at("x");
    const int in_frac = static_cast<int>(c.p("in_frac"));
    const m3v::fmt_t f = c.fmt("out");
    m3v::sat_cnt_t sat = 0;
    Vec y(x.size());
    for (size_t i = 0; i < x.size(); i++)
        y[i] = m3v::gelu<CFG::ACT_BITS>(act_t(static_cast<long long>(x[i])), in_frac, f, sat).to_int64();
    c.put("y", y);
    c.put("sat", Vec{cnt(sat)});
}

// ------------------------------------------------------------------ GEMM engine

template <class WT>
void run_gemm(Call &c) {
    m3v::gemm_args a;
    a.rows = static_cast<int>(c.p("rows"));
    a.in_dim = static_cast<int>(c.p("in_dim"));
    a.out_dim = static_cast<int>(c.p("out_dim"));
    a.x_ld = static_cast<int>(c.p("x_ld", a.in_dim));
    a.x_off = static_cast<int>(c.p("x_off", 0));
    a.w_trans = c.p("w_trans", 0) != 0;
    a.w_ld = static_cast<int>(c.p("w_ld", a.w_trans ? a.in_dim : a.out_dim));
    a.w_off = static_cast<int>(c.p("w_off", 0));
    a.y_ld = static_cast<int>(c.p("y_ld", a.out_dim));
    a.y_off = static_cast<int>(c.p("y_off", 0));
    a.gather = c.p("gather", 0) != 0;
    a.scatter = c.p("scatter", 0) != 0;
    a.has_bias = c.p("has_bias", 1) != 0;
    a.per_channel_shift = c.p("per_channel_shift", 1) != 0;
    a.fmt = c.fmt("fmt");
    a.gelu = c.p("gelu", 0) != 0;
    a.gelu_fmt = a.gelu ? c.fmt("gelu") : a.fmt;
    a.combine = c.p("combine", 0) != 0;
    a.comb_shift = static_cast<int>(c.p("comb_shift", 0));
    need(a.rows >= 1 && a.rows <= CFG::MAX_ROWS, "gemm: rows outside 1..MAX_ROWS");
    need(a.in_dim >= 1 && a.in_dim <= CFG::MAX_IN, "gemm: in_dim outside 1..MAX_IN");
    need(a.out_dim >= 1 && a.out_dim <= CFG::MAX_OUT, "gemm: out_dim outside 1..MAX_OUT");
    const size_t nx = sz(c.p("x_rows", a.rows)) * sz(a.x_ld);
    const size_t nw = a.w_trans ? sz(a.out_dim) * sz(a.w_ld) : sz(a.in_dim) * sz(a.w_ld);
    const size_t ny = sz(c.p("y_rows", a.rows)) * sz(a.y_ld);
    std::vector<act_t> x = to_ap<act_t>(c.a("x", nx));
    std::vector<m3v::idx_t> gi = to_ap<m3v::idx_t>(c.a("gather_idx", sz(a.rows)));
    std::vector<m3v::idx_t> si = to_ap<m3v::idx_t>(c.a("scatter_idx", sz(a.rows)));
    for (size_t r = 0; r < sz(a.rows); r++) {
        need(!a.gather || gi[r] * a.x_ld + a.x_off + a.in_dim <= static_cast<int64_t>(nx),
             "gemm: gather index out of range");
        need(!a.scatter || si[r] * a.y_ld + a.y_off + a.out_dim <= static_cast<int64_t>(ny),
             "gemm: scatter index out of range");
    }
    std::vector<WT> w = to_ap<WT>(c.a("w", nw));
    std::vector<acc_t> b = to_ap<acc_t>(c.a("bias", sz(a.out_dim)));
    std::vector<m3v::shift_t> sh = to_ap<m3v::shift_t>(c.a("shift", sz(a.out_dim)));
    std::vector<m3v::score_t> sc = to_ap<m3v::score_t>(c.a("score", sz(a.rows)));
    std::vector<act_t> y = to_ap<act_t>(c.a("y", ny));
    std::vector<acc_t> comb = to_ap<acc_t>(c.a("comb", a.combine ? ny : 0));
    m3v::sat_cnt_t sat = 0, sat_gelu = 0;
    m3v::gemm<CFG, WT>(a, x.data(), gi.data(), w.data(), b.data(), sh.data(), sc.data(), si.data(), y.data(),
                       comb.data(), sat, sat_gelu);
    c.put("y", from_ap(y));
    c.put("comb", from_ap(comb));
    c.put("sat", Vec{cnt(sat), cnt(sat_gelu)});
}

void op_gemm(Call &c) {
    if (c.p("act_weights", 0))
        run_gemm<act_t>(c);
    else
        run_gemm<wgt_t>(c);
}

void op_combine_finish(Call &c) {
    const int rows = static_cast<int>(c.p("rows")), dim = static_cast<int>(c.p("dim"));
    const int comb_ld = static_cast<int>(c.p("comb_ld", dim)), out_ld = static_cast<int>(c.p("out_ld", dim));
    need(rows >= 1 && rows <= CFG::MAX_ROWS && dim >= 1 && dim <= CFG::MAX_DIM, "combine_finish: size");
    std::vector<acc_t> comb = to_ap<acc_t>(c.a("comb", sz(rows) * sz(comb_ld)));
    std::vector<act_t> out(sz(rows) * sz(out_ld));
    m3v::sat_cnt_t sat = 0;
    m3v::combine_finish<CFG>(rows, dim, comb.data(), comb_ld, c.fmt("fmt"), out.data(), out_ld, sat);
    c.put("out", from_ap(out));
    c.put("sat", Vec{cnt(sat)});
}

// ------------------------------------------------------------------ LayerNorm

void op_layernorm(Call &c) {
    m3v::ln_args a;
    a.rows = static_cast<int>(c.p("rows"));
    a.dim = static_cast<int>(c.p("dim"));
    a.x_ld = static_cast<int>(c.p("x_ld", a.dim));
    a.z_ld = static_cast<int>(c.p("z_ld", a.dim));
    a.eps = static_cast<unsigned long long>(c.p("eps"));
    a.beta_shift = static_cast<int>(c.p("beta_shift"));
    a.out_fmt = c.fmt("out");
    need(a.rows >= 1 && a.rows <= CFG::MAX_TOKENS && a.dim >= 1 && a.dim <= CFG::MAX_DIM, "layernorm: size");
    std::vector<act_t> x = to_ap<act_t>(c.a("x", sz(a.rows) * sz(a.x_ld)));
    std::vector<m3v::ln_gamma_t> g = to_ap<m3v::ln_gamma_t>(c.a("gamma", sz(a.dim)));
    std::vector<acc_t> b = to_ap<acc_t>(c.a("beta", sz(a.dim)));
    std::vector<m3v::shift_t> os = to_ap<m3v::shift_t>(c.a("out_shift", sz(a.dim)));
    std::vector<act_t> z(sz(a.rows) * sz(a.z_ld));
    m3v::sat_cnt_t sn = 0, so = 0;
    m3v::layernorm<CFG>(a, x.data(), g.data(), b.data(), os.data(), z.data(), sn, so);
    c.put("z", from_ap(z));
    c.put("sat", Vec{cnt(sn), cnt(so)});
}

// ------------------------------------------------------------------ attention

void op_attention(Call &c) {
    m3v::attn_args a;
    a.tq = static_cast<int>(c.p("tq"));
    a.tk = static_cast<int>(c.p("tk"));
    a.heads = static_cast<int>(c.p("heads"));
    a.dh = static_cast<int>(c.p("dh"));
    const int D = a.heads * a.dh;
    a.q_ld = a.k_ld = a.v_ld = a.o_ld = D;
    a.score_shift = static_cast<int>(c.p("score_shift"));
    a.score_fmt = c.fmt("score");
    a.out_shift = static_cast<int>(c.p("out_shift"));
    a.out_fmt = c.fmt("out");
    need(a.tq >= 1 && a.tq <= CFG::MAX_TOKENS && a.tk >= 1 && a.tk <= CFG::MAX_KEYS, "attention: tokens");
    need(a.heads >= 1 && a.heads <= CFG::MAX_HEADS && a.dh >= 1 && a.dh <= CFG::MAX_DH, "attention: heads");
    std::vector<act_t> q = to_ap<act_t>(c.a("q", sz(a.tq) * sz(D)));
    std::vector<act_t> k = to_ap<act_t>(c.a("k", sz(a.tk) * sz(D)));
    std::vector<act_t> v = to_ap<act_t>(c.a("v", sz(a.tk) * sz(D)));
    std::vector<act_t> o(sz(a.tq) * sz(D));
    m3v::sat_cnt_t ss = 0, so = 0;
    m3v::attention<CFG>(a, q.data(), k.data(), v.data(), o.data(), ss, so);
    c.put("o", from_ap(o));
    c.put("sat", Vec{cnt(ss), cnt(so)});
}

void op_softmax_av_partial(Call &c) {
    const int tq = static_cast<int>(c.p("tq")), tk = static_cast<int>(c.p("tk")), dh = static_cast<int>(c.p("dh"));
    const int frac = static_cast<int>(c.p("frac"));
    need(tq >= 1 && tq <= CFG::MAX_TOKENS && tk >= 1 && tk <= CFG::MAX_KEYS && dh >= 1 && dh <= CFG::MAX_DH,
         "softmax_av_partial: size");
    std::vector<act_t> s = to_ap<act_t>(c.a("s", sz(tq) * sz(tk)));
    std::vector<act_t> v = to_ap<act_t>(c.a("v", sz(tk) * sz(dh)));
    std::vector<act_t> m = to_ap<act_t>(c.a("m", sz(tq)));
    std::vector<m3v::psum_t> ps = to_ap<m3v::psum_t>(c.a("psum", sz(tq)));
    std::vector<m3v::pv_t> pv = to_ap<m3v::pv_t>(c.a("pv", sz(tq) * sz(dh)));
    m3v::softmax_av_partial<CFG>(tq, tk, dh, s.data(), tk, v.data(), dh, m.data(), frac, ps.data(), pv.data());
    c.put("psum", from_ap(ps));
    c.put("pv", from_ap(pv));
}

void op_softmax_av_finish(Call &c) {
    const int tq = static_cast<int>(c.p("tq")), dh = static_cast<int>(c.p("dh"));
    need(tq >= 1 && tq <= CFG::MAX_TOKENS && dh >= 1 && dh <= CFG::MAX_DH, "softmax_av_finish: size");
    std::vector<m3v::psum_t> ps = to_ap<m3v::psum_t>(c.a("psum", sz(tq)));
    for (const m3v::psum_t &v : ps)
        need(v >= 1, "softmax_av_finish: psum must be >= 1");
    std::vector<m3v::pv_t> pv = to_ap<m3v::pv_t>(c.a("pv", sz(tq) * sz(dh)));
    std::vector<act_t> o(sz(tq) * sz(dh));
    m3v::sat_cnt_t sat = 0;
    m3v::softmax_av_finish<CFG>(tq, dh, ps.data(), pv.data(), static_cast<int>(c.p("out_shift")), c.fmt("out"),
                                o.data(), dh, sat);
    c.put("o", from_ap(o));
    c.put("sat", Vec{cnt(sat)});
}

// ------------------------------------------------------------------ MoE

void op_moe_gate(Call &c) {
    const int T = static_cast<int>(c.p("T")), N = static_cast<int>(c.p("N")), K = static_cast<int>(c.p("K"));
    need(T >= 1 && T <= CFG::MAX_TOKENS && N >= 1 && N <= CFG::MAX_EXPERTS && K >= 1 && K <= N && K <= CFG::MAX_K,
         "moe_gate: size");
    std::vector<act_t> l = to_ap<act_t>(c.a("logits", sz(T) * sz(N)));
    std::vector<m3v::idx_t> idx(sz(T) * sz(K));
    std::vector<m3v::score_t> sc(sz(T) * sz(K));
    m3v::sat_cnt_t sat = 0;
    m3v::moe_gate<CFG>(T, N, K, static_cast<int>(c.p("frac")), l.data(), N, idx.data(), sc.data(), sat);
    c.put("idx", from_ap(idx));
    c.put("score", from_ap(sc));
    c.put("sat", Vec{cnt(sat)});
}

void op_expert_queues(Call &c) {
    const int T = static_cast<int>(c.p("T")), K = static_cast<int>(c.p("K")), N = static_cast<int>(c.p("N"));
    need(T >= 1 && T <= CFG::MAX_TOKENS && N >= 1 && N <= CFG::MAX_EXPERTS && K >= 1 && K <= CFG::MAX_K,
         "expert_queues: size");
    const Vec idx64 = c.a("idx", sz(T) * sz(K));
    for (int64_t e : idx64)
        need(e >= 0 && e < N, "expert_queues: expert index out of range");
    std::vector<m3v::idx_t> idx = to_ap<m3v::idx_t>(idx64);
    std::vector<m3v::idx_t> tok(sz(T) * sz(K)), slot(sz(T) * sz(K)), off(sz(N) + 1);
    m3v::expert_queues<CFG>(T, K, N, idx.data(), tok.data(), slot.data(), off.data());
    c.put("tok", from_ap(tok));
    c.put("slot", from_ap(slot));
    c.put("off", from_ap(off));
}

void op_moe_combine(Call &c) {
    const int T = static_cast<int>(c.p("T")), K = static_cast<int>(c.p("K")), D = static_cast<int>(c.p("D"));
    const bool per_expert = c.p("per_expert", 0) != 0;
    need(T >= 1 && T <= CFG::MAX_TOKENS && K >= 1 && K <= CFG::MAX_K && D >= 1 && D <= CFG::MAX_DIM,
         "moe_combine: size");
    std::vector<m3v::score_t> sc = to_ap<m3v::score_t>(c.a("score", sz(T) * sz(K)));
    std::vector<act_t> y = to_ap<act_t>(c.a("y", sz(T) * sz(K) * sz(D)));
    std::vector<m3v::idx_t> idx = to_ap<m3v::idx_t>(c.a("idx", sz(T) * sz(K)));
    std::vector<m3v::shift_t> sh = to_ap<m3v::shift_t>(c.a("shift", CFG::MAX_EXPERTS));
    std::vector<act_t> out(sz(T) * sz(D));
    m3v::sat_cnt_t sat = 0;
    m3v::moe_combine<CFG>(T, K, D, sc.data(), y.data(), idx.data(), sh.data(), per_expert, c.fmt("fmt"), out.data(),
                          sat);
    c.put("out", from_ap(out));
    c.put("sat", Vec{cnt(sat)});
}

// ------------------------------------------------------------------ element-wise

void op_residual_add(Call &c) {
    const int rows = static_cast<int>(c.p("rows")), dim = static_cast<int>(c.p("dim"));
    const int a_ld = static_cast<int>(c.p("a_ld", dim)), b_ld = static_cast<int>(c.p("b_ld", dim));
    need(rows >= 1 && rows <= CFG::MAX_TOKENS && dim >= 1 && dim <= CFG::MAX_DIM, "residual_add: size");
    std::vector<act_t> a = to_ap<act_t>(c.a("a", sz(rows) * sz(a_ld)));
    std::vector<act_t> b = to_ap<act_t>(c.a("b", (b_ld ? sz(rows) * sz(b_ld) : 0) + sz(dim)));
    std::vector<act_t> z(sz(rows) * sz(dim));
    m3v::sat_cnt_t sat = 0;
    m3v::residual_add<CFG>(rows, dim, a.data(), a_ld, b.data(), b_ld, static_cast<int>(c.p("a_shift")),
                           static_cast<int>(c.p("b_shift")), c.fmt("fmt"), z.data(), dim, sat);
    c.put("z", from_ap(z));
    c.put("sat", Vec{cnt(sat)});
}

void op_prepend_cls(Call &c) {
    const int n = static_cast<int>(c.p("n")), dim = static_cast<int>(c.p("dim"));
    need(n >= 0 && n + 1 <= CFG::MAX_TOKENS && dim >= 1 && dim <= CFG::MAX_DIM, "prepend_cls: size");
    std::vector<act_t> tok = to_ap<act_t>(c.a("tokens", sz(n) * sz(dim)));
    std::vector<act_t> cls = to_ap<act_t>(c.a("cls", sz(dim)));
    std::vector<act_t> out(sz(n + 1) * sz(dim));
    m3v::prepend_cls<CFG>(n, dim, tok.data(), cls.data(), out.data());
    c.put("out", from_ap(out));
}

void op_patchify(Call &c) {
    const int ch = static_cast<int>(c.p("ch")), h = static_cast<int>(c.p("height")), w = static_cast<int>(c.p("width"));
    const int p = static_cast<int>(c.p("p"));
    need(p >= 1 && h % p == 0 && w % p == 0, "patchify: p must divide the image");
    need((h / p) * (w / p) <= CFG::MAX_ROWS && ch * p * p <= CFG::MAX_IN, "patchify: size");
    std::vector<act_t> img = to_ap<act_t>(c.a("img", sz(ch) * sz(h) * sz(w)));
    std::vector<act_t> out(sz((h / p) * (w / p)) * sz(ch * p * p));
    m3v::patchify<CFG>(ch, h, w, p, img.data(), out.data());
    c.put("out", from_ap(out));
}

void op_config(Call &c) {
    c.put("config", Vec{CFG::P_IN, CFG::P_OUT, CFG::ACT_BITS, CFG::WEIGHT_BITS, CFG::ACC_BITS, CFG::MAX_TOKENS,
                        CFG::MAX_DIM, CFG::MAX_HIDDEN, CFG::MAX_EXPERTS, CFG::MAX_K, CFG::MAX_HEADS});
}

typedef void (*OpFn)(Call &);

const std::map<std::string, OpFn> &ops() {
    static const std::map<std::string, OpFn> table = {
        {"rshift_round", op_rshift_round},
        {"saturate", op_saturate},
        {"requant", op_requant},
        {"exp_int", op_exp_int},
        {"recip_int", op_recip_int},
        {"rsqrt_int", op_rsqrt_int},
        {"gelu", op_gelu},
        {"gemm", op_gemm},
        {"combine_finish", op_combine_finish},
        {"layernorm", op_layernorm},
        {"attention", op_attention},
        {"softmax_av_partial", op_softmax_av_partial},
        {"softmax_av_finish", op_softmax_av_finish},
        {"moe_gate", op_moe_gate},
        {"expert_queues", op_expert_queues},
        {"moe_combine", op_moe_combine},
        {"residual_add", op_residual_add},
        {"prepend_cls", op_prepend_cls},
        {"patchify", op_patchify},
        {"config", op_config},
    };
    return table;
}

} // namespace

int main(int argc, char **argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s REQUEST RESPONSE\n", argv[0]);
        return 2;
    }
    FILE *in = std::fopen(argv[1], "rb");
    if (!in) {
        std::fprintf(stderr, "cannot open %s\n", argv[1]);
        return 2;
    }
    std::vector<Call> calls;
    try {
        Reader rd{in};
        const int64_t n = rd.i64();
        for (int64_t i = 0; i < n; i++) {
            Call c;
            c.op = rd.str();
            const int64_t np = rd.i64();
            for (int64_t j = 0; j < np; j++) {
                const std::string k = rd.str();
                c.params[k] = rd.i64();
            }
            const int64_t na = rd.i64();
            for (int64_t j = 0; j < na; j++) {
                const std::string k = rd.str();
                c.arrays[k] = rd.vec();
            }
            auto it = ops().find(c.op);
            if (it == ops().end())
                throw Fail("unknown op '" + c.op + "'");
            it->second(c);
            calls.push_back(std::move(c));
        }
    } catch (const std::exception &e) {
        std::fclose(in);
        std::fprintf(stderr, "op_driver: %s\n", e.what());
        return 1;
    }
    std::fclose(in);
    FILE *out = std::fopen(argv[2], "wb");
    if (!out) {
        std::fprintf(stderr, "cannot open %s\n", argv[2]);
        return 2;
    }
    Writer wr{out};
    for (const Call &c : calls) {
        wr.i64(static_cast<int64_t>(c.out.size()));
        for (const auto &kv : c.out) {
            wr.str(kv.first);
            wr.vec(kv.second);
        }
    }
    return std::fclose(out) == 0 ? 0 : 2;
}
