// latro::stop_positions and latro::stop_positions_step against brute-force references.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "latro/latro.h"
#include "test_util.h"

namespace {

using Seq = std::vector<int64_t>;

// Owns the flattened tokens/offsets that latro::StopSequences points into.
struct Stops {
  std::vector<int64_t> tokens;
  std::vector<int64_t> offsets{0};
  explicit Stops(const std::vector<Seq>& seqs) {
    for (const Seq& s : seqs) {
      tokens.insert(tokens.end(), s.begin(), s.end());
      offsets.push_back(static_cast<int64_t>(tokens.size()));
    }
  }
  latro::StopSequences view() const {
    latro::StopSequences s;
    s.tokens = tokens.data();
    s.offsets = offsets.data();
    s.count = static_cast<int64_t>(offsets.size()) - 1;
    s.token_count = static_cast<int64_t>(tokens.size());
    return s;
  }
};

bool occurs_at(const int64_t* row, int64_t len, const Seq& seq, int64_t pos) {
  if (pos < 0 || pos + static_cast<int64_t>(seq.size()) > len) return false;
  for (size_t i = 0; i < seq.size(); ++i) {
    if (row[pos + static_cast<int64_t>(i)] != seq[i]) return false;
  }
  return true;
}

// Earliest begin >= start of any complete occurrence, else len.
int64_t brute_earliest(const int64_t* row, int64_t len, const std::vector<Seq>& seqs, int64_t start) {
  for (int64_t pos = start; pos < len; ++pos) {
    for (const Seq& s : seqs) {
      if (occurs_at(row, len, s, pos)) return pos;
    }
  }
  return len;
}

// Where the row first completes a stop sequence (begin >= start): the earliest end; on the same
// end, the first sequence in the given order. Else len.
int64_t brute_first_completed(const int64_t* row, int64_t len, const std::vector<Seq>& seqs,
                              int64_t start) {
  for (int64_t end = start; end < len; ++end) {
    for (const Seq& s : seqs) {
      const int64_t begin = end - static_cast<int64_t>(s.size()) + 1;
      if (begin >= start && occurs_at(row, len, s, begin)) return begin;
    }
  }
  return len;
}

std::vector<int64_t> run_positions(const std::vector<int64_t>& tokens, int64_t rows, int64_t len,
                                   int64_t stride, const std::vector<Seq>& seqs, int64_t start) {
  const Stops stops(seqs);
  std::vector<int64_t> out(static_cast<size_t>(rows), -5);
  latro::stop_positions(tokens.data(), rows, len, stride, stops.view(), start, out.data());
  return out;
}

int64_t one_row(const std::vector<int64_t>& row, const std::vector<Seq>& seqs, int64_t start = 0) {
  const int64_t len = static_cast<int64_t>(row.size());
  return run_positions(row, 1, len, len, seqs, start)[0];
}

// ---------------------------------------------------------------- hand-written cases
TEST(StopPositions, HandWritten) {
  const int64_t E = 2;  // an EOS id
  // none -> len
  EXPECT_EQ(one_row({5, 6, 7, 8}, {{9}, {6, 8}}), 4);
  // single token
  EXPECT_EQ(one_row({5, 6, E, 8}, {{E}}), 2);
  // at position 0 and at `start`
  EXPECT_EQ(one_row({E, 6, 7}, {{E}}), 0);
  EXPECT_EQ(one_row({1, 2, 3, 4, 5}, {{3, 4}}, 2), 2);
  // before `start` is ignored, also when it straddles `start`
  EXPECT_EQ(one_row({3, 4, 1, 3, 4}, {{3, 4}}, 1), 3);
  EXPECT_EQ(one_row({1, 3, 4, 5}, {{3, 4}}, 2), 4);
  // at the very end, and cut off by the end
  EXPECT_EQ(one_row({1, 1, 7, 8, 9}, {{7, 8, 9}}), 2);
  EXPECT_EQ(one_row({1, 1, 1, 7, 8}, {{7, 8, 9}}), 5);
  // overlapping: "aab" in "aaab" starts at 1; "aa" in "aaa" starts at 0
  EXPECT_EQ(one_row({1, 1, 1, 2}, {{1, 1, 2}}), 1);
  EXPECT_EQ(one_row({4, 1, 1, 1}, {{1, 1}}), 1);
  // a partial match followed by the real one
  EXPECT_EQ(one_row({7, 8, 7, 8, 9, 0}, {{7, 8, 9}}), 2);
  // multiple sequences: the earliest begin wins, whatever the order
  EXPECT_EQ(one_row({0, 5, 6, 7, 2}, {{E}, {5, 6, 7}}), 1);
  EXPECT_EQ(one_row({0, 5, 6, 7, 2}, {{5, 6, 7}, {E}}), 1);
  EXPECT_EQ(one_row({0, 5, 6, 9, 2}, {{5, 6, 7}, {E}}), 4);
  // a longer sequence that begins earlier than a shorter one that ends earlier
  EXPECT_EQ(one_row({1, 2, 3, 4}, {{1, 2, 3, 4}, {2}}), 0);
  // start == len: nothing can match
  EXPECT_EQ(one_row({E, E}, {{E}}, 2), 2);
  // a sequence longer than the row
  EXPECT_EQ(one_row({1, 2}, {{1, 2, 3}}), 2);
}

TEST(StopPositions, RowStrideAndRowRange) {
  // 3 rows of len 4 in a stride of 6; the padding contains the stop token and must be ignored.
  const int64_t P = 2;
  const std::vector<int64_t> tokens = {1, 1, 1, 1, P, P,  //
                                       1, 2, 1, 1, P, P,  //
                                       1, 1, 1, 2, P, P};
  const std::vector<Seq> seqs = {{2}};
  EXPECT_EQ(run_positions(tokens, 3, 4, 6, seqs, 0), (std::vector<int64_t>{4, 1, 3}));
  const Stops stops(seqs);
  std::vector<int64_t> out(3, -5);
  latro::stop_positions(tokens.data(), 3, 4, 6, stops.view(), 0, out.data(), 1, 2);
  EXPECT_EQ(out, (std::vector<int64_t>{-5, 1, -5}));
  latro::stop_positions(tokens.data(), 3, 4, 6, stops.view(), 0, out.data(), 2, -1);
  EXPECT_EQ(out, (std::vector<int64_t>{-5, 1, 3}));
}

TEST(StopPositionsStep, HandWritten) {
  // "The answer is" = {10, 11, 12}, EOS = {2}: the long sequence completes at step 3 (it begins
  // at 1); the EOS at 4 comes later and the row keeps 1.
  const std::vector<Seq> seqs = {{10, 11, 12}, {2}};
  const Stops stops(seqs);
  const std::vector<int64_t> row = {5, 10, 11, 12, 2, 7};
  const int64_t len = static_cast<int64_t>(row.size());
  std::vector<int64_t> pos = {len};
  std::vector<int64_t> seen;
  for (int64_t step = 0; step < len; ++step) {
    latro::stop_positions_step(row.data(), 1, len, len, stops.view(), step, 0, pos.data(),
                               pos.data());
    seen.push_back(pos[0]);
  }
  EXPECT_EQ(seen, (std::vector<int64_t>{6, 6, 6, 1, 1, 1}));

  // Same end for two sequences: the first in the given order wins.
  const std::vector<Seq> same_end = {{12}, {11, 12}};
  const Stops s2(same_end);
  pos = {len};
  for (int64_t step = 0; step < len; ++step) {
    latro::stop_positions_step(row.data(), 1, len, len, s2.view(), step, 0, pos.data(), pos.data());
  }
  EXPECT_EQ(pos[0], 3);
  const std::vector<Seq> same_end_swapped = {{11, 12}, {12}};
  const Stops s3(same_end_swapped);
  pos = {len};
  for (int64_t step = 0; step < len; ++step) {
    latro::stop_positions_step(row.data(), 1, len, len, s3.view(), step, 0, pos.data(), pos.data());
  }
  EXPECT_EQ(pos[0], 2);

  // A sequence ending at `step` but beginning before `start` does not count.
  pos = {len};
  std::vector<int64_t> out = {-1};
  latro::stop_positions_step(row.data(), 1, len, len, stops.view(), 3, 2, pos.data(), out.data());
  EXPECT_EQ(out[0], len);
  latro::stop_positions_step(row.data(), 1, len, len, stops.view(), 3, 1, pos.data(), out.data());
  EXPECT_EQ(out[0], 1);

  // An already stopped row keeps its position, separate in/out buffers.
  std::vector<int64_t> in = {0};
  latro::stop_positions_step(row.data(), 1, len, len, stops.view(), 4, 0, in.data(), out.data());
  EXPECT_EQ(out[0], 0);
  EXPECT_EQ(in[0], 0);
}

// ---------------------------------------------------------------- random against brute force
struct RandomCase {
  std::vector<int64_t> tokens;
  int64_t rows, len, stride;
  std::vector<Seq> seqs;
};

// Small alphabet so that matches (and overlaps) are frequent.
RandomCase random_case(std::mt19937& rng) {
  std::uniform_int_distribution<int64_t> len_dist(1, 40), rows_dist(1, 9), count_dist(1, 4),
      seq_len_dist(1, 4), alphabet(0, 3), pad_dist(0, 3);
  RandomCase c;
  c.rows = rows_dist(rng);
  c.len = len_dist(rng);
  c.stride = c.len + pad_dist(rng);
  c.tokens.resize(static_cast<size_t>(c.rows * c.stride));
  for (auto& t : c.tokens) t = alphabet(rng);
  const int64_t count = count_dist(rng);
  for (int64_t i = 0; i < count; ++i) {
    Seq s(static_cast<size_t>(seq_len_dist(rng)));
    for (auto& t : s) t = alphabet(rng);
    c.seqs.push_back(s);
  }
  return c;
}

TEST(StopPositions, RandomAgainstBruteForce) {
  std::mt19937 rng(2024);
  for (int trial = 0; trial < 2000; ++trial) {
    const RandomCase c = random_case(rng);
    const int64_t start = std::uniform_int_distribution<int64_t>(0, c.len)(rng);
    const auto got = run_positions(c.tokens, c.rows, c.len, c.stride, c.seqs, start);
    for (int64_t r = 0; r < c.rows; ++r) {
      ASSERT_EQ(got[static_cast<size_t>(r)],
                brute_earliest(c.tokens.data() + r * c.stride, c.len, c.seqs, start))
          << "trial " << trial << " row " << r << " start " << start;
    }
  }
}

TEST(StopPositionsStep, AllStepsGiveTheFirstCompletedOccurrence) {
  std::mt19937 rng(77);
  for (int trial = 0; trial < 2000; ++trial) {
    const RandomCase c = random_case(rng);
    const int64_t start = std::uniform_int_distribution<int64_t>(0, c.len - 1)(rng);
    const Stops stops(c.seqs);
    std::vector<int64_t> pos(static_cast<size_t>(c.rows), c.len);
    const bool in_place = trial % 2 == 0;
    for (int64_t step = start; step < c.len; ++step) {
      if (in_place) {
        latro::stop_positions_step(c.tokens.data(), c.rows, c.len, c.stride, stops.view(), step,
                                   start, pos.data(), pos.data());
      } else {
        std::vector<int64_t> next(pos.size(), -9);
        latro::stop_positions_step(c.tokens.data(), c.rows, c.len, c.stride, stops.view(), step,
                                   start, pos.data(), next.data());
        pos = next;
      }
      // After each step, the answer is the first completion within tokens [0, step].
      for (int64_t r = 0; r < c.rows; ++r) {
        ASSERT_EQ(pos[static_cast<size_t>(r)],
                  [&] {
                    const int64_t p = brute_first_completed(c.tokens.data() + r * c.stride,
                                                            step + 1, c.seqs, start);
                    return p == step + 1 ? c.len : p;
                  }())
            << "trial " << trial << " row " << r << " step " << step;
      }
    }
    for (int64_t r = 0; r < c.rows; ++r) {
      const int64_t* row = c.tokens.data() + r * c.stride;
      const int64_t first = brute_first_completed(row, c.len, c.seqs, start);
      ASSERT_EQ(pos[static_cast<size_t>(r)], first) << "trial " << trial << " row " << r;
      // It never begins before the earliest occurrence, and both agree on "none".
      const int64_t earliest = brute_earliest(row, c.len, c.seqs, start);
      ASSERT_GE(first, earliest);
      ASSERT_EQ(first == c.len, earliest == c.len);
    }
  }
}

// ---------------------------------------------------------------- argument errors
class StopErrors : public ::testing::Test {
 protected:
  std::vector<int64_t> tokens = {1, 2, 3, 4, 5, 6};  // 2 rows x 3
  std::vector<int64_t> out = std::vector<int64_t>(2);
  std::vector<int64_t> pos = {3, 3};
  void positions(const latro::StopSequences& s, int64_t start = 0) {
    latro::stop_positions(tokens.data(), 2, 3, 3, s, start, out.data());
  }
  void step(const latro::StopSequences& s, int64_t step, int64_t start = 0) {
    latro::stop_positions_step(tokens.data(), 2, 3, 3, s, step, start, pos.data(), out.data());
  }
};

TEST_F(StopErrors, BadStopSequences) {
  Stops empty_seq({{1, 2}, {}});
  EXPECT_THROW(latro::check_stop_sequences(empty_seq.view()), latro::Error);
  EXPECT_THROW(positions(empty_seq.view()), latro::Error);
  EXPECT_THROW(step(empty_seq.view(), 0), latro::Error);

  Stops decreasing({{1, 2}, {3}});
  decreasing.offsets = {0, 2, 1};
  EXPECT_THROW(latro::check_stop_sequences(decreasing.view()), latro::Error);
  EXPECT_THROW(positions(decreasing.view()), latro::Error);

  Stops not_from_zero({{1, 2}});
  not_from_zero.offsets = {1, 2};
  EXPECT_THROW(latro::check_stop_sequences(not_from_zero.view()), latro::Error);

  Stops ok({{1, 2}, {3}});
  EXPECT_NO_THROW(latro::check_stop_sequences(ok.view()));
  auto null_tokens = ok.view();
  null_tokens.tokens = nullptr;
  EXPECT_THROW(latro::check_stop_sequences(null_tokens), latro::Error);
  auto null_offsets = ok.view();
  null_offsets.offsets = nullptr;
  EXPECT_THROW(latro::check_stop_sequences(null_offsets), latro::Error);
  auto negative = ok.view();
  negative.count = -1;
  EXPECT_THROW(latro::check_stop_sequences(negative), latro::Error);
  auto negative_tokens = ok.view();
  negative_tokens.token_count = -1;
  EXPECT_LATRO_ERROR(latro::check_stop_sequences(negative_tokens), "token_count");
}

// Offsets that end past the tokens (or short of them) are refused before any token is read:
// the last sequence would reach outside the array.
TEST_F(StopErrors, OffsetsMustEndAtTheTokenCount) {
  Stops past({{1, 2}, {3}});
  past.offsets = {0, 2, 5};
  EXPECT_LATRO_ERROR(latro::check_stop_sequences(past.view()), "offsets end at 5 but there are 3");
  EXPECT_LATRO_ERROR(positions(past.view()), "stop tokens");
  EXPECT_LATRO_ERROR(step(past.view(), 1), "stop tokens");
  Stops short_of({{1, 2}, {3}});
  short_of.offsets = {0, 1, 2};
  EXPECT_LATRO_ERROR(positions(short_of.view()), "offsets end at 2 but there are 3");
  latro::StopSequences none;  // no sequence, no tokens: offsets may be left out, or {0}
  EXPECT_NO_THROW(positions(none));
  const std::vector<int64_t> zero{0}, five{5}, two_tokens{7, 8};
  none.offsets = zero.data();
  EXPECT_NO_THROW(positions(none));
  none.offsets = five.data();
  EXPECT_LATRO_ERROR(positions(none), "offsets must start at 0, got 5");
  latro::StopSequences tokens_without_sequences{two_tokens.data(), zero.data(), 0, 2};
  EXPECT_LATRO_ERROR(latro::check_stop_sequences(tokens_without_sequences),
                     "offsets end at 0 but there are 2 stop tokens");
  EXPECT_LATRO_ERROR(step(tokens_without_sequences, 1), "stop tokens");
}

TEST_F(StopErrors, BadStartAndStep) {
  Stops ok(std::vector<Seq>{{2}});
  EXPECT_NO_THROW(positions(ok.view(), 3));  // start == len is allowed
  EXPECT_LATRO_ERROR(positions(ok.view(), -1), "start");
  EXPECT_LATRO_ERROR(positions(ok.view(), 4), "start");
  EXPECT_NO_THROW(step(ok.view(), 2));
  EXPECT_LATRO_ERROR(step(ok.view(), 3), "step");
  EXPECT_LATRO_ERROR(step(ok.view(), -1), "step");
  EXPECT_LATRO_ERROR(step(ok.view(), 1, -1), "start");
}

TEST_F(StopErrors, BadShapes) {
  Stops ok(std::vector<Seq>{{2}});
  EXPECT_THROW(latro::stop_positions(nullptr, 2, 3, 3, ok.view(), 0, out.data()), latro::Error);
  EXPECT_THROW(latro::stop_positions(tokens.data(), 2, 3, 3, ok.view(), 0, nullptr), latro::Error);
  EXPECT_THROW(latro::stop_positions(tokens.data(), -1, 3, 3, ok.view(), 0, out.data()),
               latro::Error);
  EXPECT_THROW(latro::stop_positions(tokens.data(), 2, 3, 2, ok.view(), 0, out.data()),
               latro::Error);  // row_stride < len
  EXPECT_THROW(latro::stop_positions_step(tokens.data(), 2, 3, 3, ok.view(), 0, 0, nullptr,
                                          out.data()),
               latro::Error);
}

}  // namespace
