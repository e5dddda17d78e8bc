package hbone

import (
	"bytes"
	"net"
	"testing"
)

// recConn records each Write it gets.
type recConn struct {
	net.Conn
	writes [][]byte
}

func (r *recConn) Write(p []byte) (int, error) {
	r.writes = append(r.writes, bytes.Clone(p))
	return len(p), nil
}

// The records of a batch go out in one write, in order, when it ends;
// outside a batch every write goes through at once; a batch that would
// grow past batchSize writes what it holds first.
func TestBatchConnGathersRecordsOfABurst(t *testing.T) {
	rec := &recConn{}
	b := BatchWrites(rec).(*batchConn)
	b.Write([]byte("alone"))
	if len(rec.writes) != 1 {
		t.Fatalf("a write outside a batch: %d writes, want 1 at once", len(rec.writes))
	}
	b.begin()
	b.Write([]byte("one,"))
	b.Write([]byte("two,"))
	b.Write([]byte("three"))
	if len(rec.writes) != 1 {
		t.Fatalf("%d writes during the batch, want none before it ends", len(rec.writes)-1)
	}
	if err := b.end(); err != nil {
		t.Fatal(err)
	}
	if len(rec.writes) != 2 || string(rec.writes[1]) != "one,two,three" {
		t.Fatalf("after the batch: %q, want one write of %q", rec.writes[1:], "one,two,three")
	}
	if b.buf != nil {
		t.Error("the batch buffer is held after the batch ended")
	}
	rec.writes = nil
	big := bytes.Repeat([]byte{'r'}, 16<<10+22)
	b.begin()
	for range 5 {
		b.Write(big)
	}
	b.end()
	if len(rec.writes) != 2 || len(rec.writes[0]) != 4*len(big) || len(rec.writes[1]) != len(big) {
		t.Errorf("5 full records went out as %d writes, want 2 (4 records, then 1)", len(rec.writes))
	}
}
